#!/usr/bin/env python3
"""Checks MQTT discovery configs with Home Assistant's own code (the `homeassistant` package).

Usage: ha_discovery_check.py CONFIGS.json [PREFIX]

CONFIGS.json is a list of [topic, payload] pairs as the device publishes them. Each topic must
be one Home Assistant's discovery matches (its TOPIC_MATCHER, a supported component); each
payload must pass that component's DISCOVERY_SCHEMA, and every key must survive it (the schemas
silently drop keys they do not know, so a misspelt key would otherwise pass). Used by
tests/mqtt.rs; never by the device.
"""

import importlib
import json
import sys

try:
    import voluptuous as vol
    from homeassistant.components.mqtt import discovery
except ImportError as e:
    sys.exit(
        f"cannot import Home Assistant ({e}): tools/test.sh makes a venv with it; or "
        "`pip install --no-deps -r tools/ha-requirements.txt` and set CLIPACT_HA_PYTHON"
    )


def check(topic: str, payload: dict, prefix: str) -> list[str]:
    if not topic.startswith(prefix + "/"):
        return [f"{topic}: not under the discovery prefix {prefix!r}"]
    match = discovery.TOPIC_MATCHER.match(topic[len(prefix) + 1 :])
    if not match:
        return [f"{topic}: Home Assistant ignores this topic (illegal characters)"]
    component = match.group("component")
    if component not in discovery.SUPPORTED_COMPONENTS:
        return [f"{topic}: component {component!r} is not supported"]
    schema = importlib.import_module(f"homeassistant.components.mqtt.{component}").DISCOVERY_SCHEMA
    try:
        valid = schema(dict(payload))
    except vol.Invalid as e:
        return [f"{topic}: {e}"]
    dropped = sorted(set(payload) - set(valid))
    if dropped:
        return [f"{topic}: keys Home Assistant does not know (dropped): {dropped}"]
    return []


def main() -> int:
    configs = json.load(open(sys.argv[1]))
    prefix = sys.argv[2] if len(sys.argv) > 2 else "homeassistant"
    errors = [e for topic, payload in configs for e in check(topic, payload, prefix)]
    for e in errors:
        print(e)
    print(f"{len(configs)} configs, {len(errors)} refused")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
