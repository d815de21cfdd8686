"""Models on demand: each model's memory footprint from its GGUF file and the per-device plan (``plan``), the model
manager that loads and unloads on-demand models within it (``manager``, supervisord's ``lifecycle`` program), and a
proxy worker's side of that manager (``client``)."""
