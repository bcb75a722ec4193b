"""Files the bundle carries for serving, copied as they are (``targets.bundle.write_bundle``): the Triton python
backend's ``model.py`` that runs the exported ONNX file with onnxruntime (``triton_python_model.py``), and the
``client.py`` that calls a served bundle with tritonclient. Neither imports compressor: a service runs them
without it."""
