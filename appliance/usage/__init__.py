"""Usage accounting: the durable ledger of requests and tokens per hour, client and model (``ledger``), and the
``appliance usage`` report (``command``)."""

#: What the report can group by (a UTC day or hour).
GROUP_FIELDS = ("client", "model", "day", "hour")
