#!/usr/bin/env bash
# Set up pneumonode on a fresh Debian/Ubuntu machine: the DICOM programs it works with
# (dcmtk, Orthanc, dicom3tools) from apt, then a virtual environment in .venv with the
# project and its test tools, then the built OHIF viewer for the viewer test (into a cache
# folder outside the repository). Run as root (or with sudo) for the apt part.
set -euo pipefail
cd "$(dirname "$0")"

if command -v apt-get >/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dcmtk orthanc dicom3tools openssl python3-venv prometheus >/dev/null
    # The viewer test (tests/test_viewer_ohif.py): Orthanc's DICOMweb plugin, and headless
    # Chromium with its WebDriver (no display needed).
    $SUDO apt-get install -y -qq orthanc-dicomweb chromium chromium-driver >/dev/null
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

# OHIF v3, the built viewer as the npm registry publishes it, checked against its pinned
# integrity and unpacked once (tests/test_viewer_ohif.py finds it there, or at
# $PNEUMONODE_OHIF_DIST). Skipped, with a warning, where neither npm nor curl is present.
OHIF_VERSION=3.13.2
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
OHIF_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/pneumonode/ohif-$OHIF_VERSION"
if [ ! -f "$OHIF_DIR/dist/index.html" ]; then
    work="$(mktemp -d)"
    if command -v npm >/dev/null; then
        (cd "$work" && npm pack -q "@ohif/app@$OHIF_VERSION" >/dev/null)
    elif command -v curl >/dev/null; then
        curl -fsSL -o "$work/ohif-app-$OHIF_VERSION.tgz" \
            "https://registry.npmjs.org/@ohif/app/-/app-$OHIF_VERSION.tgz"
    fi
    tarball="$work/ohif-app-$OHIF_VERSION.tgz"
    if [ -f "$tarball" ]; then
        got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
        if [ "$got" != "$OHIF_INTEGRITY" ]; then
            echo "error: @ohif/app@$OHIF_VERSION integrity $got, expected $OHIF_INTEGRITY" >&2
            rm -rf "$work"
            exit 1
        fi
        mkdir -p "$work/unpacked" "$(dirname "$OHIF_DIR")"
        tar -xzf "$tarball" -C "$work/unpacked" package/dist
        rm -rf "$OHIF_DIR"
        mv "$work/unpacked/package" "$OHIF_DIR"
    else
        echo "warning: neither npm nor curl: OHIF not fetched, the viewer test will skip" >&2
    fi
    rm -rf "$work"
fi
echo "pneumonode is installed: .venv/bin/pneumonode --help"
