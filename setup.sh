#!/usr/bin/env bash
# Set up pneumonode on a fresh Debian/Ubuntu machine: the DICOM programs it works with
# (dcmtk, Orthanc, dicom3tools) from apt, then a virtual environment in .venv with the
# project and its test tools. Run as root (or with sudo) for the apt part.
set -euo pipefail
cd "$(dirname "$0")"

if command -v apt-get >/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dcmtk orthanc dicom3tools openssl python3-venv >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision first, pinned together: a torchvision that does not match torch
# fails to import.
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
# Everything else from the pinned tree in constraints.txt: the node adapts pynetdicom's
# internals and checks at start that they are the release it was written for.
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
echo "pneumonode is installed: .venv/bin/pneumonode --help"
