#!/usr/bin/env bash
# Install the Debian TeX packages that `make paper` (latexmk + pdflatex) needs.
# Idempotent: does nothing when latexmk is already on PATH.
# Uses sudo when not root and sudo exists.
set -euo pipefail
if command -v latexmk >/dev/null 2>&1 && command -v pdflatex >/dev/null 2>&1; then
    echo "install_tex: latexmk and pdflatex already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_tex: need root (or sudo) to apt-get install TeX" >&2; exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends \
    latexmk texlive-latex-base texlive-latex-recommended texlive-latex-extra \
    texlive-fonts-recommended
echo "install_tex: done ($(command -v latexmk))"
