"""Runs cases on a vector-quantize-pytorch release other than the test environment's (see reference_1_32.py).

Started as ``python reference_worker.py SPEC OUT`` with the release first on PYTHONPATH.  SPEC is a JSON list of
cases; each case's inputs are in ``OUT/<name>.in.safetensors`` and its results go to ``OUT/<name>.safetensors``:
the module's state before (``state.*``) and after (``after.*``) one forward and backward, the outputs, the
input's gradient.  Only tensors cross the process boundary (safetensors, no pickle).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import vector_quantize_pytorch as reference


def run(case: dict, out: Path) -> None:
    torch.manual_seed(case["seed"])
    module = getattr(reference, case["class"])(**case["config"])
    module.train(case["train"])
    state = {f"state.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    inputs = load_file(out / f"{case['name']}.in.safetensors")
    x = inputs["x"].requires_grad_(case["train"])
    kwargs = {"mask": inputs["mask"]} if "mask" in inputs else {}
    quantized, indices, loss = module(x, **kwargs)[:3]
    results = {"quantized": quantized.detach(), "indices": indices, "loss": loss.detach().reshape(-1)}
    if case["train"]:
        ((quantized * inputs["grad"]).sum() + loss.sum()).backward()
        results["x_grad"] = x.grad
    results.update({f"after.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    save_file({k: v.contiguous() for k, v in {**state, **results}.items()}, out / f"{case['name']}.safetensors")


if __name__ == "__main__":
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    for case in spec:
        run(case, out)
    print(reference.__file__)
