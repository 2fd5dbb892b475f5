# Source on a GPU machine that cannot reach PyPI, from the repository root:
#   source scripts/gpu_env.sh PARTS_DIR WHEELS_DIR [REDIS_DIR]
# PARTS_DIR holds part00.. of an xz tarball of onnxruntime-gpu's package folder (the
# wheel is larger than one transfer, so it travels in pieces), WHEELS_DIR the service's
# pure-Python/cp312 wheels, REDIS_DIR a redis-server binary with its libraries. It
# installs into /tmp/site, puts the CUDA libraries that PyTorch's image ships on
# LD_LIBRARY_PATH for onnxruntime-gpu, and starts Redis on 6379 unless one answers.
# Where pip works, `pip install onnxruntime-gpu` and a system Redis replace all this.
parts=$1 wheels=$2 redis_dir=${3:-}
site=/tmp/site
mkdir -p "$site"
if [ ! -d "$site/onnxruntime" ]; then
  cat "$parts"/part* | xz -dc | tar x -C "$site" || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl || return 1
fi
export PYTHONPATH="$site:$PWD"
libs=$(find / -xdev \( -name 'libcublasLt.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' \
  -o -name 'libcufft.so.12' -o -name 'libcudnn.so.9' -o -name 'libnvrtc.so.13' \) 2>/dev/null \
  | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# the custom-op library's CUDA kernel for this machine's GPU only (all-major is slower)
export CTR_OPS_CUDA_ARCH=${CTR_OPS_CUDA_ARCH:--arch=native}
if [ -n "$redis_dir" ] && ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  LD_LIBRARY_PATH="$redis_dir" "$redis_dir/redis-server" --port 6379 --save '' --appendonly no --daemonize yes
  sleep 1
fi
# ORT lists the CUDA provider even when its libraries do not load, and then makes CPU
# sessions without an error: a real session must come up on CUDA, or nothing is measured
python3 - <<'PY' || { echo "gpu_env: no working CUDA provider (see the error above)" >&2; return 1; }
import onnxruntime as o
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
p = o.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"]).get_providers()
print("onnxruntime", o.__version__, o.get_available_providers(), "a session runs on", p[0])
raise SystemExit(p[0] != "CUDAExecutionProvider")
PY
