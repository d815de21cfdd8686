"""State shared by the appliance's processes on one host, below every layer that uses it: the proxy workers' request
counters (``hostload``) and the on-demand models' states (``modelstate``)."""
