"""Names shared by the supervisord config generator and the processes that read supervisord's state."""

from __future__ import annotations

import re

from appliance.config import ModelConfig

PROXY_PROGRAM = "proxy"
EXPORTER_PROGRAM = "exporter"
EVENTS_PROGRAM = "events"
#: The model manager (appliance.lifecycle), present when some model loads on demand.
LIFECYCLE_PROGRAM = "lifecycle"


def program_name(model: ModelConfig) -> str:
    """supervisord program name of a model's llama-server (supervisord refuses ':' and friends in names)."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model.name)
