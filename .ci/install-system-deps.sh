#!/usr/bin/env bash
# System packages the tests need beyond the Python venv: GStreamer's RTSP server (tests/rtsp_server.py runs
# it under the system /usr/bin/python3, whose gi bindings come from python3-gi), the Mosquitto MQTT broker
# and Chromium for the web console's browser tests.
# Debian/Ubuntu, as root.
# Idempotent and quiet: does nothing when everything is already installed.
set -euo pipefail

packages=(
  python3-gi
  gir1.2-gstreamer-1.0
  gir1.2-gst-rtsp-server-1.0
  gstreamer1.0-rtsp
  gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good  # rtph264pay, qtdemux
  gstreamer1.0-plugins-bad  # openh264enc, h264parse
  gstreamer1.0-tools
  mosquitto  # the MQTT broker tests/mosquitto.py starts (tests/test_mqtt.py)
  postgresql  # initdb/pg_ctl for the shared-gallery tests (tests/postgres.py starts a throwaway cluster)
  chromium  # the headless browser Playwright drives for the console tests (tests/test_console_browser.py)
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: need root to install: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-deps: installed ${missing[*]}"
