"""Call a bundle served by Triton Inference Server and print each example's top-k class names (copied into the
bundle as ``client.py``; needs numpy and ``tritonclient[http]`` or ``tritonclient[grpc]``, not compressor).

    python client.py --url localhost:8000 inputs.npy                     # HTTP, the bundle's python-backend model
    python client.py --url localhost:8001 --protocol grpc --model student --top-k 3 inputs.npy
    python client.py --url localhost:8000 tokens.npz                     # a text model: arrays by input name

``inputs.npy`` holds raw inputs (N, ...) as ``Bundle.predict`` takes them; they are normalised here exactly as the
bundle's metadata.json says (``(float32(x) - mean_c) / std_c`` per channel, the training pipeline's
``apply_normalisation``), because Triton feeds the model what it receives. A text model's ``tokens.npz`` holds one
(N, L) integer array per input named in metadata.json's ``inputs`` (``input_ids``, ``attention_mask``, ...),
right-padded with 0s; they are sent as they are, in the inputs' dtypes. Triton's dynamic batcher joins only
requests of the same shape, so a service that pads every request to one length lets it batch them all. From
Python::

    from client import ServedBundle
    served = ServedBundle("bundle/", "localhost:8000")
    logits = served.logits(x)                      # (N, C) float32; x a dict of arrays for a text model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def normalise(x: np.ndarray, normalisation: dict | None) -> np.ndarray:
    """Raw inputs (N, C_in, ...) to the model's float32 inputs: the bundle's per-channel mean and std."""
    x = np.asarray(x).astype(np.float32, copy=False)
    if normalisation is None:
        return x
    broadcast = (1, -1) + (1,) * (x.ndim - 2)
    mean = np.asarray(normalisation["mean"], dtype=np.float32).reshape(broadcast)
    std = np.asarray(normalisation["std"], dtype=np.float32).reshape(broadcast)
    return (x - mean) / std


class ServedBundle:
    """A bundle's model as a Triton server serves it: ``logits(x)`` sends raw inputs in batches of at most the
    config's ``max_batch_size`` over HTTP or gRPC."""

    def __init__(self, bundle: str | Path = HERE, url: str = "localhost:8000", protocol: str = "http",
                 model: str | None = None):
        self.metadata = json.loads((Path(bundle) / "metadata.json").read_text(encoding="utf-8"))
        self.model = model or f"{self.metadata.get('model_name', 'student')}_python"
        if protocol == "http":
            import tritonclient.http as client
        elif protocol == "grpc":
            import tritonclient.grpc as client
        else:
            raise ValueError(f"protocol {protocol!r}: choose http or grpc")
        self.client_module, self.client = client, client.InferenceServerClient(url=url)
        self.max_batch = max(self.metadata.get("serving", {}).get("batch_sizes", [64]))
        self.inputs = self.metadata.get("inputs") or [self.metadata["input"]]  # every model input, in call order

    def feed(self, x) -> dict[str, np.ndarray]:
        """The model's inputs by name: raw inputs normalised, or a text model's arrays in their declared dtypes."""
        if not isinstance(x, dict):
            if len(self.inputs) > 1:
                raise ValueError(f"the model takes {', '.join(s['name'] for s in self.inputs)}: pass a dict of arrays")
            spec = self.inputs[0]
            if np.dtype(spec["dtype"]).kind in "iu":  # token ids: sent as they are
                return {spec["name"]: np.asarray(x).astype(spec["dtype"], copy=False)}
            return {spec["name"]: normalise(x, self.metadata["normalisation"])}
        missing = [spec["name"] for spec in self.inputs if spec["name"] not in x]
        if missing:
            raise ValueError(f"no array for input {', '.join(missing)} (the model takes "
                             f"{', '.join(s['name'] for s in self.inputs)})")
        return {spec["name"]: np.asarray(x[spec["name"]]).astype(spec["dtype"], copy=False) for spec in self.inputs}

    def logits(self, x) -> np.ndarray:
        """(N, ...) raw inputs, or a dict of (N, L) arrays by input name -> (N, C) float32 logits from the server."""
        from tritonclient.utils import np_to_triton_dtype

        feed = self.feed(x)
        spec_out = self.metadata["output"]
        rows = len(next(iter(feed.values())))
        parts = []
        for start in range(0, rows, self.max_batch):
            tensors = []
            for name, array in feed.items():
                batch = np.ascontiguousarray(array[start:start + self.max_batch])
                tensor = self.client_module.InferInput(name, list(batch.shape), np_to_triton_dtype(batch.dtype))
                tensor.set_data_from_numpy(batch)
                tensors.append(tensor)
            wanted = self.client_module.InferRequestedOutput(spec_out["name"])
            result = self.client.infer(self.model, tensors, outputs=[wanted])
            parts.append(result.as_numpy(spec_out["name"]))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def top_k(self, x, k: int = 1) -> list[list[tuple[str, float]]]:
        """Each example's ``k`` most likely classes, as (class name, probability)."""
        logits = self.logits(x)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        names = self.metadata.get("class_names") or [str(c) for c in range(logits.shape[1])]
        order = np.argsort(-probabilities, axis=1)[:, :k]
        return [[(names[c], float(row[c])) for c in top] for row, top in zip(probabilities, order)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Top-k class names from a bundle served by Triton.")
    parser.add_argument("inputs", type=Path, help=".npy file of raw inputs (N, ...), or a text model's .npz of "
                        "(N, L) arrays by input name")
    parser.add_argument("--url", default="localhost:8000", help="host:port (HTTP 8000, gRPC 8001 by default)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--model", default=None, help="the served model's name (default: <model_name>_python)")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--bundle", type=Path, default=HERE, help="the bundle folder (default: this file's)")
    args = parser.parse_args(argv)
    served = ServedBundle(args.bundle, args.url, args.protocol, args.model)
    loaded = np.load(args.inputs)
    inputs = dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    for n, row in enumerate(served.top_k(inputs, args.top_k)):
        print(f"{n}: " + ", ".join(f"{name} ({p:.3f})" for name, p in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
