"""Machine stall probe: sleeps 1 ms in a loop for SECONDS and prints how late the
wake-ups were (p50, p99, max, and how many were over 20 ms). A stall that this idle
process also sees is the machine's, not the service's. Usage: jitter.py SECONDS"""

import sys
import time

end = time.perf_counter() + float(sys.argv[1])
late = []
while (now := time.perf_counter()) < end:
    time.sleep(0.001)
    late.append((time.perf_counter() - now - 0.001) * 1000)
late.sort()
n = len(late)
print(
    f"jitter: {n} sleeps, late p50 {late[n // 2]:.3f} ms, p99 {late[int(n * 0.99)]:.3f} ms,"
    f" max {late[-1]:.1f} ms, over 20 ms: {sum(x > 20 for x in late)}"
)
