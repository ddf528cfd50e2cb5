"""Runs cases on a vector-quantize-pytorch release other than the test environment's (see reference_release.py).

Started as ``python reference_worker.py SPEC OUT`` with the release first on PYTHONPATH.  SPEC is a JSON list of
cases; each case's inputs are in ``OUT/<name>.in.safetensors`` (``kw.*``: tensor arguments of the forward call;
``pre<i>``: inputs of the calls ``pre_steps`` makes first) and its results go to ``OUT/<name>.safetensors``:
the module's state before (``state.*``) and after (``after.*``) one forward (with the case's ``forward``
arguments), its backward and the calls of ``post_methods``; the outputs (``breakdown.i`` for a loss
breakdown), the input's gradient and the parameters' (``grad.*``); with ``x_eval``, the eval outputs (``eval_quantized``, ``eval_indices``)
after it all.  Only tensors cross the process boundary (safetensors, no pickle).
"""

import copy
import functools
import json
import operator
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import vector_quantize_pytorch as reference


def module_from_spec(spec: dict) -> torch.nn.Module:
    """A module argument (a vq_bridge): {"module": "Linear", "args": [16, 16]}; its weights come with the state."""
    return getattr(torch.nn, spec["module"])(*spec["args"])


def run(case: dict, out: Path) -> None:
    if "diveq_variance" in case:  # ResidualVQ(diveq=True) hard-codes its noise: fix it for a comparison
        import vector_quantize_pytorch.residual_vq as residual_vq
        from vector_quantize_pytorch.vector_quantize_pytorch import directional_reparam  # 1.24.0 and later

        residual_vq.directional_reparam = functools.partial(directional_reparam, noise_variance=case["diveq_variance"])
    torch.manual_seed(case["seed"])
    # JSON gives lists: per-layer codebook sizes must be a tuple, FSQ levels a list (older releases add lists)
    config = {key: module_from_spec(value) if isinstance(value, dict) and "module" in value
              else tuple(value) if isinstance(value, list) and key == "codebook_size" else value
              for key, value in case["config"].items()}
    module = getattr(reference, case["class"])(**config)
    module.train(case["train"])
    state = {f"state.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    frozen = copy.deepcopy(module) if case.get("frozen_gradient") else None
    inputs = load_file(out / f"{case['name']}.in.safetensors")
    x = inputs["x"].requires_grad_(case["train"])
    kwargs = {key: inputs[key] for key in ("mask", "lens") if key in inputs}
    kwargs.update({key[3:]: value for key, value in inputs.items() if key.startswith("kw.")})
    for i, forward in enumerate(case.get("pre_steps", [])):  # earlier calls (micro-batches), no backward
        module(inputs[f"pre{i}"], **forward)
    outputs = module(x, **kwargs, **case.get("forward", {}))
    if len(outputs) == 2 and isinstance(outputs[0], tuple):  # LFQ's (Return, LossBreakdown)
        outputs = (*outputs[0], outputs[1])
    quantized, indices = outputs[:2]
    loss = outputs[2] if len(outputs) > 2 else torch.zeros(())  # FSQ returns no loss
    results = {"quantized": quantized.detach(), "loss": loss.detach().reshape(-1)}
    if isinstance(indices, tuple):  # HierarchicalVQ: one index map per level
        results.update({f"indices.{i}": level for i, level in enumerate(indices)})
    elif indices is not None:  # FSQ(return_indices=False) gives none
        results["indices"] = indices
    if len(outputs) == 4 and isinstance(outputs[3], dict):  # FSP's info
        results["info.level_indices"] = outputs[3]["level_indices"]
    elif len(outputs) == 4:  # return_loss_breakdown
        results.update({f"breakdown.{i}": term.detach().reshape(-1) for i, term in enumerate(outputs[3])})
    if case["train"]:
        ((quantized * inputs["grad"]).sum() + loss.sum()).backward()
        results["x_grad"] = x.grad
        results.update({f"grad.{name}": p.grad for name, p in module.named_parameters() if p.grad is not None})
        if frozen is not None:
            # a gradient through the distances: 1.32.0's backward would read the codebook its EMA step has
            # overwritten in place (through .data), so it is taken from a step that leaves the codebook alone
            x = inputs["x"].detach().clone().requires_grad_()
            quantized, _, loss = frozen(x, **kwargs, **case.get("forward", {}), freeze_codebook=True)[:3]
            ((quantized * inputs["grad"]).sum() + loss.sum()).backward()
            results["x_grad"] = x.grad
    for name in case.get("post_methods", []):
        operator.attrgetter(name)(module)()
    results.update({f"after.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    if "x_eval" in inputs:  # the trained module encodes held-out data
        module.eval()
        with torch.no_grad():
            quantized, indices = module(inputs["x_eval"])[:2]
        results.update(eval_quantized=quantized, eval_indices=indices)
    save_file({k: v.detach().clone().contiguous() for k, v in {**state, **results}.items()},  # no shared storage
              out / f"{case['name']}.safetensors")


if __name__ == "__main__":
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    for case in spec:
        run(case, out)
    print(reference.__file__)
