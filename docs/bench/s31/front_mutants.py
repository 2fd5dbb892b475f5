# ruff: noqa: E501  (a table of code fragments, one mutant a line)
"""Mutants of service/front.py against tests/test_front.py (session 31's record).

Each mutant replaces one piece of service/front.py in a copy of the checkout and runs
tests/test_front.py there; CAUGHT: the tests failed. Usage, from the checkout:

    rm -rf /tmp/mut && cp -r . /tmp/mut && \
    CTR_TEST_REDIS_URL=redis://127.0.0.1:16400/13 .venv/bin/python \
        docs/bench/s31/front_mutants.py /tmp/mut > docs/bench/s31/front-mutants.txt
"""

import os
import subprocess
import sys
import time

REPO = sys.argv[1]
FRONT = f"{REPO}/service/front.py"
FLAT_FROM = """        try:
            response = await _answer(handler, headers.get, cycle)
        except Exception as exc:
            # a bug: the app's 500 (nothing has been sent yet), then raised on, as
            # ScoringApp raises it to uvicorn
            await _write(cycle, internal_error_response(exc), rid)
            raise
"""
FLAT_TO = """        response = await _answer(handler, headers.get, cycle)
"""
FLAT_EXCEPT = """    except BaseException as exc:
"""
FLAT_EXCEPT_TO = """    except Exception as exc:
        if not cycle.response_started:
            await _write(cycle, internal_error_response(exc), rid)
        log.error("Exception in ASGI application\\n", exc_info=exc)
        cycle.transport.close()
        return
    except BaseException as exc:
"""
MUTANTS = {
    "no close when keep-alive is off": [
        (
            "    if not keep_alive:\n        cycle.transport.close()\n    cycle.on_response()",
            "    cycle.on_response()",
        )
    ],
    "no message_event.set()": [("    cycle.message_event.set()\n", "")],
    "no response_complete = True": [("    cycle.response_complete = True\n", "")],
    "no response_started = True": [("    cycle.response_started = True\n", "")],
    "no drain while writing is paused": [
        (
            "    if cycle.flow.write_paused and not cycle.disconnected:\n        await cycle.flow.drain()\n",
            "",
        )
    ],
    "no check for a client gone": [
        (
            "    if cycle.disconnected:\n        return\n    cycle.response_started",
            "    cycle.response_started",
        )
    ],
    "the concurrency limit's 503 bypassed": [
        ("if front is not None and app is self.app:", "if front is not None:")
    ],
    "no BaseException branch": [
        ("    except BaseException as exc:\n", "    except ZeroDivisionError as exc:\n")
    ],
    "no on_response reset": [
        ("        cycle.on_response = lambda: None  # as run_asgi", "        pass  # as run_asgi")
    ],
    "task not discarded from uvicorn's set": [
        ("                task.add_done_callback(self.tasks.discard)\n", "")
    ],
    "task not in uvicorn's set": [("                self.tasks.add(task)\n", "")],
    "always keep-alive": [("    keep_alive = cycle.keep_alive  #", "    keep_alive = True  #")],
    "no uvicorn 500 in the BaseException branch": [
        (
            "        if not cycle.response_started:\n            await cycle.send_500_response()\n        else:\n            cycle.transport.close()",
            "        cycle.transport.close()",
        )
    ],
    "waiting_for_100_continue not cleared": [("    cycle.waiting_for_100_continue = False\n", "")],
    "no CURRENT.reset": [("    CURRENT.reset(token)\n", "")],
    "proxy rewrite whatever the access log": [
        (
            "if proxy is not None and cycle.access_log and cycle.access_logger.isEnabledFor(INFO):",
            "if proxy is not None:",
        )
    ],
    "no proxy rewrite": [("        await proxy(scope, None, None)", "        pass")],
    "the front worked out per connection": [
        (
            "        self.front, self.proxy = _front_of(self.config) if SUPPORTED",
            "        self.front, self.proxy = _front(self.app) if SUPPORTED",
        )
    ],
    "on_response before the write": [
        (
            '    cycle.transport.write(b"".join(content))\n',
            '    cycle.on_response()\n    cycle.transport.write(b"".join(content))\n',
        )
    ],
    "the bug's 500 inside a flat except (before the second review)": [
        (FLAT_FROM, FLAT_TO),
        (FLAT_EXCEPT, FLAT_EXCEPT_TO),
    ],
}
orig = open(FRONT).read()
try:
    for name, edits in MUTANTS.items():
        text = orig
        for a, b in edits:
            assert text.count(a) == 1, (name, a)
            text = text.replace(a, b)
        open(FRONT, "w").write(text)
        t = time.time()
        try:
            p = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-x",
                    "-p",
                    "no:cacheprovider",
                    "tests/test_front.py",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
                env=os.environ,
            )
            res = "CAUGHT" if p.returncode else "SURVIVED"
            last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
        except subprocess.TimeoutExpired:
            res, last = "TIMEOUT", ""
        print(f"{res:8} {time.time() - t:6.1f}s {name} | {last[:90]}", flush=True)
finally:
    open(FRONT, "w").write(orig)
