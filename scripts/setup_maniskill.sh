# ManiSkill3 for policy evaluation (caip_jax/policy/maniskill_env.py, maniskill_experts.py), after
# scripts/setup.sh; sourced or run. Silent when already done. Three steps, each once:
#  1. (root, apt-get) Mesa's lavapipe Vulkan driver from bookworm-backports: SAPIEN renders on the
#     CPU through Vulkan, and bookworm's own Mesa 22.3 lacks VK_KHR_external_semaphore_fd, which
#     SAPIEN needs. Only mesa-vulkan-drivers and the libdrm it needs come from backports; the rest
#     of Mesa (libosmesa6, which Meta-World renders with) stays bookworm's.
#  2. A check that SAPIEN renders in .venv (mani-skill is in setup.py's "maniskill" and "test"
#     extras, pinned in constraints.txt).
#  3. .venv-experts: the motion-planning experts' own venv. Their planner (mplib 0.1.1) crashes
#     under numpy 2, which .venv pins, so it gets numpy 1.26 (EXPERT_PINS below).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
experts="$root/.venv-experts"
icd=/usr/share/vulkan/icd.d/lvp_icd.json
log="$(mktemp -t setup_maniskill.XXXXXX.log)"
fail() { local where=""; [ -s "$log" ] && where=" (log: $log)"; echo "setup_maniskill.sh: $1 failed$where; fix: $2" >&2; exit 1; }

# Every package of .venv-experts (numpy 1.26: mplib 0.1.1 segfaults under numpy 2).
EXPERT_PINS="numpy==1.26.4 torch==2.13.0 mani-skill==3.0.1 mplib==0.1.1 sapien==3.0.3 opencv-python==4.11.0.86
absl-py==2.5.1 anyio==4.16.0 arm_pytorch_utilities==0.5.0 asttokens==3.0.2 certifi==2026.10.19.post1
charset-normalizer==3.5.3 click==8.5.1 cloudpickle==3.1.3 contourpy==1.3.3 cycler==0.12.1 dacite==1.9.2
defusedxml==0.7.1 docstring_parser==0.18.0 executing==2.3.0 Farama-Notifications==0.0.6 filelock==4.3.2
fonttools==4.68.0 fsspec==2026.9.0 gitdb==4.0.12 GitPython==3.2.1 gymnasium==1.4.0 h11==0.16.0 h5py==3.16.0
hf-xet==1.8.0 httpcore2==2.16.2 httpx2==2.16.2 huggingface_hub==2.4.0 idna==3.20 imageio-ffmpeg==0.8.1
ImageIO==2.38.2 importlib_resources==7.1.0 ipython==9.18.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1
Jinja2==3.1.6 kiwisolver==1.5.1 lxml==6.2.0 MarkupSafe==3.0.4 matplotlib-inline==0.2.2 matplotlib==3.11.2
mpmath==1.3.0 networkx==3.6.1 nvidia-ml-py==13.615.71 packaging==26.4 parso==0.8.7 pexpect==4.9.0
pillow==13.0.0 prompt_toolkit==3.0.53 psutil==7.2.2 ptyprocess==0.7.0 pure_eval==0.2.4 Pygments==2.21.0
pyparsing==3.3.3 pyperclip==1.11.0 python-dateutil==4.0.0 pytorch-kinematics==0.7.6 pytorch-seed==0.2.0
PyYAML==6.0.4 requests==2.34.2 scipy==1.17.1 setuptools==84.2.1 smmap==5.0.3 stack-data==0.6.3 sympy==1.14.0
tabulate==0.10.0 toppra==0.6.10 tqdm==4.70.1 traitlets==5.16.1 transforms3d==0.4.2 trimesh==5.2.0
truststore==0.10.5 typeguard==4.6.1 typing_extensions==4.16.0 tyro==1.0.17 tzdata==2026.6 urllib3==2.8.0
wcwidth==0.9.4"
pins() { tr ' ' '\n' <<< "$1" | grep . ; }
digest="$(cat "${BASH_SOURCE[0]}" "$root/constraints.txt" | sha1sum | cut -c1-12)"
experts_digest="$(sha1sum <<< "$EXPERT_PINS" | cut -c1-12)"  # remade when its pins change

# 1. The Vulkan driver.
if ! dpkg-query -W -f '${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q bpo || [ ! -f "$icd" ] \
    || ! dpkg-query -W -f '${Status}' libvulkan1 2>/dev/null | grep -q "ok installed"; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    fail "installing Mesa's Vulkan driver (needs root and apt-get)" \
      "as root, add bookworm-backports to apt's sources and apt-get install mesa-vulkan-drivers/bookworm-backports libvulkan1"
  fi
  echo "Installing Mesa's lavapipe Vulkan driver (mesa-vulkan-drivers) from bookworm-backports..."
  if ! grep -qs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      > /etc/apt/sources.list.d/bookworm-backports.sources
  fi
  # pkg/bookworm-backports: that package and only the dependencies it needs from backports (libdrm).
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    mesa-vulkan-drivers/bookworm-backports libvulkan1) > "$log" 2>&1 \
    || fail "apt-get install mesa-vulkan-drivers/bookworm-backports" "check that deb.debian.org is reachable and bookworm-backports is in /etc/apt/sources.list.d"
fi
export VK_ICD_FILENAMES="${VK_ICD_FILENAMES:-$icd}"

# A SAPIEN scene that renders one camera frame: Vulkan, the driver and SAPIEN agree.
render_check() {
  "$1/bin/python" - > "$log" 2>&1 <<'EOF'
import sapien
scene = sapien.Scene()
camera = scene.add_camera("check", 32, 32, 1.0, 0.01, 10.0)
scene.update_render()
camera.take_picture()
assert camera.get_picture("Color").shape == (32, 32, 4)
EOF
}

# 2. SAPIEN renders in the main venv.
[ -x "$venv/bin/python" ] || fail "finding $venv" "run scripts/setup.sh first"
if [ ! -f "$venv/.maniskill-$digest" ]; then
  "$venv/bin/python" -c "import mani_skill" 2> "$log" \
    || fail "import mani_skill in $venv" "pip install -c constraints.txt -e '.[maniskill]' into $venv"
  render_check "$venv" || fail "rendering with SAPIEN in $venv" "check VK_ICD_FILENAMES=$icd (lavapipe from mesa-vulkan-drivers/bookworm-backports)"
  rm -f "$venv"/.maniskill-*
  touch "$venv/.maniskill-$digest"
fi

# 3. The experts' venv.
if [ ! -f "$experts/.installed-$experts_digest" ]; then
  echo "Making the experts' venv $experts (numpy 1.26, mani-skill 3.0.1, mplib 0.1.1; a few minutes)..."
  python3 -m venv "$experts" > "$log" 2>&1 || fail "python3 -m venv $experts" "install python3-venv"
  pins "$EXPERT_PINS" > "$experts/constraints.txt"
  "$experts/bin/python" -m pip install -q -c "$experts/constraints.txt" \
    numpy==1.26.4 torch==2.13.0 mani-skill==3.0.1 mplib==0.1.1 > "$log" 2>&1 \
    || fail "pip install into $experts" "check PyPI is reachable, or delete $experts and rerun"
  render_check "$experts" || fail "rendering with SAPIEN in $experts" "check VK_ICD_FILENAMES=$icd (lavapipe from mesa-vulkan-drivers/bookworm-backports)"
  rm -f "$experts"/.installed-*
  touch "$experts/.installed-$experts_digest"
fi
rm -f "$log"
