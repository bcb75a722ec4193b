"""A Triton Inference Server model for the python backend (copied into the bundle as
``triton/<name>_python/1/model.py``): the exported ONNX student, run with onnxruntime on the CPU, batch by batch as
Triton's dynamic batcher hands them over.

It is the CPU-only way to serve a bundle: a ``tritonserver`` without the onnxruntime backend (the one in PyPI's
``nvidia-pytriton`` wheel has the python backend only) still serves it. Where the python backend's interpreter
cannot import onnxruntime, give the folders holding it as the config's ``python_path`` parameter (separated by
``os.pathsep``, searched in that order). The backend's stub is built against numpy 1 and imports numpy before
this file runs: under numpy 2 the tensors go through DLPack (see ``_tensor``).
"""

import json
import os
import sys


class TritonPythonModel:
    """Triton's python-backend interface: ``initialize`` once, ``execute`` per batch of requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        extra = config.get("parameters", {}).get("python_path", {}).get("string_value")
        for folder in reversed(extra.split(os.pathsep) if extra else []):  # the first named is searched first
            sys.path.insert(0, folder)
        import numpy
        import onnxruntime
        import triton_python_backend_utils

        self.numpy, self.utils = numpy, triton_python_backend_utils
        self.dlpack = int(numpy.__version__.split(".")[0]) >= 2  # see _tensor
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = onnxruntime.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        self.inputs = [(spec["name"], spec["data_type"]) for spec in config["input"]]
        self.output = config["output"][0]["name"]

    def execute(self, requests):
        """One response per request: the model on the request's inputs, as float32 logits."""
        responses = []
        for request in requests:
            feed = {name: self._array(self.utils.get_input_tensor_by_name(request, name)) for name, _ in self.inputs}
            (logits,) = self.session.run([self.output], feed)
            tensor = self._tensor(self.numpy.ascontiguousarray(logits, self.numpy.float32))
            responses.append(self.utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def _array(self, tensor):
        """An input tensor as a numpy array: ``as_numpy()`` under numpy 1, DLPack under numpy 2 (see ``_tensor``)."""
        return self.numpy.from_dlpack(tensor) if self.dlpack else tensor.as_numpy()

    def _tensor(self, logits):
        """The output tensor. The backend's stub is built against numpy 1 (nvidia-pytriton requires numpy < 2): a
        numpy 2 array handed to ``Tensor(name, array)`` arrives empty, so under numpy 2 it goes through DLPack,
        which arrives whole, but numpy's capsule destructor then prints a harmless traceback per request into the
        server's log."""
        if self.dlpack:
            return self.utils.Tensor.from_dlpack(self.output, logits.__dlpack__())
        return self.utils.Tensor(self.output, logits)
