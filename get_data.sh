#!/usr/bin/env bash
# Real FashionMNIST for `make demo` and CI, on a fresh machine. Usage: ./get_data.sh [DATA_PATH]   (default: data)
# Tries, in order, and stops at the first that leaves the four IDX files where data.py looks for them:
#   1. already there: the Debian package's folder, or DATA_PATH/FashionMNIST/raw (then nothing is done)
#   2. the Debian package dataset-fashion-mnist, where apt-get is usable (as root, or with password-less sudo)
#   3. torchvision's download into DATA_PATH, where the network allows
#   4. otherwise one line saying which files to put where, and exit status 1
# The environment can point the steps elsewhere (the tests do, to run every branch without root or network):
#   DC_SYSTEM_DIR (the package's folder), DC_APT_GET, DC_SUDO (commands), DC_PYTHON (python with torchvision),
#   DC_UID (the user id that decides whether sudo is needed).
set -u
cd "$(dirname "$0")"

DATA_PATH="${1:-data}"
SYSTEM_DIR="${DC_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}"
LOCAL_DIR="$DATA_PATH/FashionMNIST/raw"
APT_GET="${DC_APT_GET:-apt-get}"
SUDO_CMD="${DC_SUDO:-sudo}"
PYTHON="${DC_PYTHON:-python3}"
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

have_files() {  # all four IDX files, plain or .gz, in folder $1
  for f in $FILES; do
    [ -f "$1/$f" ] || [ -f "$1/$f.gz" ] || return 1
  done
}

found() { echo "get_data: FashionMNIST $1"; exit 0; }

have_files "$SYSTEM_DIR" && found "found in $SYSTEM_DIR"
have_files "$LOCAL_DIR" && found "found in $LOCAL_DIR"

# 2. the Debian package: as root directly, otherwise only through sudo that asks no password
notes=""
if command -v "$APT_GET" >/dev/null 2>&1; then
  run_root=""
  if [ "${DC_UID:-$(id -u)}" -eq 0 ]; then
    run_root=" "
  elif command -v "$SUDO_CMD" >/dev/null 2>&1 && "$SUDO_CMD" -n true >/dev/null 2>&1; then
    run_root="$SUDO_CMD -n"
  fi
  if [ -n "$run_root" ]; then
    echo "get_data: installing the Debian package dataset-fashion-mnist"
    $run_root "$APT_GET" install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
      { $run_root "$APT_GET" update -q >/dev/null 2>&1 && \
        $run_root "$APT_GET" install -y -q dataset-fashion-mnist >/dev/null 2>&1; }
    have_files "$SYSTEM_DIR" && found "installed in $SYSTEM_DIR"
    notes="apt-get install dataset-fashion-mnist failed"
  else
    notes="apt-get needs root (no password-less sudo)"
  fi
else
  notes="no apt-get"
fi

# 3. torchvision's download, through the loader's own download function (the layout data.py reads)
echo "get_data: downloading FashionMNIST with torchvision into $DATA_PATH"
if "$PYTHON" -c "import sys, data; data._download_with_torchvision('FashionMNIST', sys.argv[1])" "$DATA_PATH" \
    >/dev/null 2>&1 && have_files "$LOCAL_DIR"; then
  found "downloaded to $LOCAL_DIR"
fi
notes="$notes; torchvision's download failed, no network?"

echo "error: FashionMNIST data not found: $notes. To fix: place train-images-idx3-ubyte, train-labels-idx1-ubyte," \
     "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (plain or .gz) in $LOCAL_DIR," \
     "or install the Debian package dataset-fashion-mnist, or rerun with network access." >&2
exit 1
