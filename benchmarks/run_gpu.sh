#!/usr/bin/env bash
# Kept for old notes: the device check replaced this script (see benchmarks/device_check.sh).
exec bash "$(dirname "$0")/device_check.sh" "$@"
