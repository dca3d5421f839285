# Sourced by demo.sh and test.sh: makes .venv with every pinned dependency (once per change of
# constraints.txt or setup.py), then activates it. Needs only python3 with pip and venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(cat "$root/constraints.txt" "$root/setup.py" | sha1sum | cut -c1-12)"
# Meta-World renders with MuJoCo through OSMesa (CPU): Debian's libosmesa6, once, as root.
if ! ldconfig -p | grep -q libOSMesa && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  echo "Installing libosmesa6 (MuJoCo's CPU renderer)..."
  (apt-get install -y -q libosmesa6 || (apt-get update -q && apt-get install -y -q libosmesa6)) > /dev/null
fi
if [ ! -f "$stamp" ]; then
  echo "Installing caip-jax and its pinned dependencies into $venv (about a minute)..."
  python3 -m venv "$venv"
  # torch first, pinned: the CPU build, so that nothing pulls a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" torch
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]"
  touch "$stamp"
fi
# ManiSkill3's Vulkan driver and its experts' venv (once; optional: without them its tests skip).
"$root/scripts/setup_maniskill.sh" || echo "ManiSkill3 is not set up (above): its tests skip, caip-policy-eval --suite maniskill cannot run" >&2
source "$venv/bin/activate"
cd "$root"
