"""``appliance status``: one screen per host for an operator (models, the helper programs, the host's health)."""
