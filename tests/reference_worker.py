"""Runs cases on a vector-quantize-pytorch release other than the test environment's (see reference_release.py).

Started as ``python reference_worker.py SPEC OUT`` with the release first on PYTHONPATH.  SPEC is a JSON list of
cases; each case's inputs are in ``OUT/<name>.in.safetensors`` (``kw.*``: tensor arguments of the forward call;
``pre<i>``: inputs of the calls ``pre_steps`` makes first; ``set.*``: values its ``set_after_step`` parameters
take after the step) and its results go to ``OUT/<name>.safetensors``:
the module's state before (``state.*``) and after (``after.*``) one forward (with the case's ``forward``
arguments), its backward and the calls of ``post_methods``; the outputs (``breakdown.i`` for a loss
breakdown), the input's gradient and the parameters' (``grad.*``); with ``x_eval``, the eval outputs
(``eval_quantized``, ``eval_indices``, ``eval_decoded`` with ``decode_method``) after it all, and the state the
eval left (``eval_state.*``: releases that move statistics in eval).  A case with ``trajectory`` trains an
autoencoder around the module instead (see ``run_trajectory``).  Only tensors cross the process boundary
(safetensors, no pickle).

``out_of_place_codebook``: the release's codebook writes (EMA step, dead-code replacement) go to new storage, so
the tensors its forward saved for backward keep the values the forward used.  Unpatched, its writes through
``.data`` reach them, and the backward differentiates codes the forward never used (README, differences).
"""

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


OUT_OF_PLACE = {"on": False}  # the case being run asks for out-of-place codebook writes


def out_of_place_codebook_writes() -> None:
    """Give the codebook's buffers new storage before each of the release's in-place writes to them, while
    ``OUT_OF_PLACE["on"]``."""
    from vector_quantize_pytorch import vector_quantize_pytorch as module

    def fresh_storage(method):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            if OUT_OF_PLACE["on"]:
                for name in ("embed", "embed_avg", "cluster_size"):
                    buffer = getattr(self, name)
                    buffer.data = buffer.data.clone()
            return method(self, *args, **kwargs)
        return wrapped

    for cls in vars(module).values():
        if isinstance(cls, type) and hasattr(cls, "update_ema"):
            for name in ("update_ema", "expire_codes_"):
                if hasattr(cls, name):
                    setattr(cls, name, fresh_storage(getattr(cls, name)))


def build(case: dict) -> torch.nn.Module:
    # JSON gives lists: per-layer codebook sizes must be a tuple, FSQ levels a list (older releases add lists)
    config = {key: module_from_spec(value) if isinstance(value, dict) and "module" in value
              else tuple(value) if isinstance(value, list) and key == "codebook_size" else value
              for key, value in case["config"].items()}
    return getattr(reference, case["class"])(**config)


def run(case: dict, out: Path) -> None:
    if "diveq_variance" in case:  # ResidualVQ(diveq=True) hard-codes its noise: fix it for a comparison
        import vector_quantize_pytorch.residual_vq as residual_vq
        from vector_quantize_pytorch.vector_quantize_pytorch import directional_reparam  # 1.24.0 and later

        residual_vq.directional_reparam = functools.partial(directional_reparam, noise_variance=case["diveq_variance"])
    torch.manual_seed(case["seed"])
    module = build(case)
    module.train(case["train"])
    state = {f"state.{k}": v.detach().clone() for k, v in module.state_dict().items()}
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
    for name in case.get("post_methods", []):
        operator.attrgetter(name)(module)()
    with torch.no_grad():
        for name in case.get("set_after_step", []):
            operator.attrgetter(name)(module).copy_(inputs[f"set.{name}"])
    results.update({f"after.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    if "x_eval" in inputs:  # the trained module encodes held-out data
        module.eval()
        with torch.no_grad():
            quantized, indices = module(inputs["x_eval"])[:2]
            if "decode_method" in case:
                results["eval_decoded"] = getattr(module, case["decode_method"])(indices)
        results.update(eval_quantized=quantized, eval_indices=indices)
        results.update({f"eval_state.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    save_file({k: v.detach().clone().contiguous() for k, v in {**state, **results}.items()},  # no shared storage
              out / f"{case['name']}.safetensors")


class Autoencoder(torch.nn.Module):
    """A linear encoder, the quantizer, a linear decoder: what a tokenizer trains around a quantizer."""

    def __init__(self, quantizer: torch.nn.Module, features: int, dim: int):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = torch.nn.Linear(features, dim), quantizer, torch.nn.Linear(dim, features)

    def forward(self, x: torch.Tensor):
        quantized, indices, loss = self.quantizer(self.encoder(x))[:3]
        reconstructed = self.decoder(quantized)
        return quantized, indices, loss, torch.nn.functional.mse_loss(reconstructed, x) + loss.sum()


def run_trajectory(case: dict, out: Path) -> None:
    """Train ``Autoencoder`` with Adam on the batches ``x`` (steps, batch, n, features) for ``steps`` steps; each
    step's state before it (``step<t>.state.*``), outputs, gradients and quantizer state after the step's
    forward and backward (``step<t>.after.*``, before the optimizer moves the weights)."""
    torch.manual_seed(case["seed"])
    batches = load_file(out / f"{case['name']}.in.safetensors")["x"]
    model = Autoencoder(build(case), batches.shape[-1], case["config"]["dim"]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=case["trajectory"]["lr"])
    results = {}
    for step, x in enumerate(batches):
        prefix = f"step{step}."
        results.update({f"{prefix}state.{k}": v.detach().clone() for k, v in model.state_dict().items()})
        quantized, indices, loss, total = model(x)
        total.backward()
        results.update({prefix + "quantized": quantized.detach(), prefix + "indices": indices,
                        prefix + "loss": loss.detach().reshape(-1), prefix + "total": total.detach().reshape(-1)})
        results.update({f"{prefix}grad.{k}": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        results.update({f"{prefix}after.{k}": v.detach().clone() for k, v in model.state_dict().items()})
        optimizer.step()
        optimizer.zero_grad()
    save_file({k: v.detach().clone().contiguous() for k, v in results.items()}, out / f"{case['name']}.safetensors")


if __name__ == "__main__":
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    out_of_place_codebook_writes()
    for case in spec:
        OUT_OF_PLACE["on"] = case.get("out_of_place_codebook", False)
        (run_trajectory if "trajectory" in case else run)(case, out)
    print(reference.__file__)
