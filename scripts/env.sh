# Sourced by the project's scripts: environment shared by the demo, tests and benchmarks.
# wgpu (through wonnx) needs a runtime directory; CI shells may not have one.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -w "${XDG_RUNTIME_DIR}" ]; then
  export XDG_RUNTIME_DIR="/tmp/rxvision-runtime-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
# The Python reference tools (ONNX Runtime, Pillow) live in the project-local venv.
export RXVISION_PYTHON="${RXVISION_PYTHON:-$PWD/.venv/bin/python}"
