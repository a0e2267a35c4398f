#!/bin/sh
# System packages hxc's tests need: Mesa's Vulkan drivers (lavapipe, a software Vulkan
# device) and the Vulkan loader, so Vulkan artifacts really run on a machine without a GPU;
# a C++ compiler for the inductor backend (AOTInductor compiles C++ at `hxc compile`).
set -eu
PKGS="mesa-vulkan-drivers libvulkan1 g++"
if dpkg -s $PKGS >/dev/null 2>&1; then
    echo "install-system-deps: system packages already installed ($PKGS)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: no apt-get; install a Vulkan loader and Mesa's lavapipe driver yourself" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: installing system packages ($PKGS)…"
$SUDO apt-get install -y -qq $PKGS >/dev/null 2>&1 || {
    echo "install-system-deps: updating apt's package lists, then installing again…"
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq $PKGS >/dev/null
}
echo "install-system-deps: installed $PKGS"
