"""T4's starting weights (--init): from scratch, a T3 best.pt, or torchvision's ImageNet
ResNet-18, loaded tensor by tensor where names and shapes match (the CUBS and embedding
parameters of a ResNet-18 state dict are skipped, and said so)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import CheckpointError, load_checkpoint, load_matching_tensors
from common.errors import ConfigError, DownloadError
from common.files import file_sha256

INIT_CHOICES = ("auto", "scratch", "t3", "imagenet")


def load_initial_weights(model: torch.nn.Module, init: str, *, t3_best: Path | None, t3_results: str,
                         init_weights: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Load the weights `init` asks for into `model` and return what happened, under the
    results.json keys init, init_source, init_sha256 (of the file read), init_loaded, init_skipped.

    init: auto (t3 if `t3_best` exists, else scratch), scratch, t3 (`t3_best`, found next to
    `t3_results`) or imagenet (`init_weights`, a local state dict, else a download)."""
    if init == "auto":
        init = "t3" if t3_best else "scratch"
        if verbose:
            found = (f"a T3 run at {t3_best}" if t3_best else f"no T3 best.pt found from "
                     f"{t3_results} (--t3-results names T3's placements.json)")
            print(f"--init auto: {found} -> --init {init}")
    if init == "scratch":
        return {"init": "scratch"}
    if init == "t3":
        if t3_best is None:
            raise ConfigError(f"--init t3 needs a T3 best.pt next to {t3_results}; "
                              f"run t3_cubs.py first or use --init scratch")
        state, source, path = load_checkpoint(t3_best)["model"], str(t3_best), Path(t3_best)
    elif init_weights:
        try:  # as every checkpoint: weights_only, and a refusal that says why
            state = load_checkpoint(init_weights)
        except CheckpointError as err:
            raise ConfigError(f"--init-weights: {err}") from None
        source, path = init_weights, Path(init_weights)
    else:  # needs internet (cached afterwards in ~/.cache/torch)
        from torchvision.models import ResNet18_Weights
        url = ResNet18_Weights.IMAGENET1K_V1.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name  # where torchvision keeps it
        if not cached.is_file():
            try:  # checked against the SHA256 prefix in its name, then moved into place
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(cached), torch.hub.HASH_REGEX.search(cached.name)[1],
                                               progress=verbose)
            except (OSError, RuntimeError) as err:  # URLError: no internet; RuntimeError: a bad hash
                raise DownloadError(f"--init imagenet could not download torchvision's ResNet-18 weights "
                                    f"({err}); download them elsewhere and pass --init-weights PATH") from None
        try:  # as every checkpoint: weights_only, so a file planted in the cache cannot run code
            state = load_checkpoint(cached)
        except CheckpointError as err:
            raise ConfigError(f"--init imagenet: {err} (torchvision's cached ResNet-18 weights: delete "
                              f"the file to download it again, or pass --init-weights PATH)") from None
        source, path = "torchvision IMAGENET1K_V1", cached
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = (f"keys {', '.join(map(str, list(state)[:5]))}" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise ConfigError(f"--init {init}: {source} is not a state dict of tensors ({held}); "
                          f"--init-weights takes torchvision's ResNet-18 state dict (resnet18-f37072fd.pth), "
                          f"and a checkpoint of these scripts starts T4 with --init t3")
    state, stem_skipped = _without_stem_batchnorm(model, state)
    loaded, skipped = load_matching_tensors(model, state)
    skipped = [r for r in skipped if r.split(":")[0] not in stem_skipped] + list(stem_skipped.values())
    # Only a conv or linear weight (ndim >= 2) shows that the networks agree: BatchNorm's step
    # counters (0-d) and the CUBS blocks' biases (size d or 3) match at any --width.
    if not any(state[name].ndim >= 2 for name in loaded):
        raise ConfigError(f"--init {init}: no weight of {source} fits this network: names or shapes "
                          f"differ everywhere (its first: {', '.join(list(state)[:3])}; this network's: "
                          f"{', '.join(list(model.state_dict())[:3])}). A state dict saved from a wrapper "
                          f"(DDP's 'module.' prefix) or of another --width loads nothing.")
    if verbose:
        print(f"--init {init}: loaded {len(loaded)} tensors from {source}; skipped {len(skipped)}:")
        for reason in skipped[:12]:
            print(f"  {reason}")
        if len(skipped) > 12:
            print(f"  ... and {len(skipped) - 12} more (listed in results.json)")
    return {"init": init, "init_source": source, "init_sha256": file_sha256(path), "init_loaded": len(loaded),
            "init_skipped": skipped}


def _without_stem_batchnorm(model: torch.nn.Module, state: dict[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state without bn1.*, {name: skip reason}) when the stem conv does not fit (T3's 3x3
    cifar stem, T4's 7x7 one): that BatchNorm's statistics and scale describe the skipped
    conv's outputs, so the fresh conv keeps a fresh BatchNorm. Else (state, {})."""
    own = model.state_dict()
    if "conv1.weight" not in state or "conv1.weight" not in own or \
            state["conv1.weight"].shape == own["conv1.weight"].shape:
        return state, {}
    stem = {k: f"{k}: the stem BatchNorm of the skipped conv1 (fresh init)" for k in state if k.startswith("bn1.")}
    return {k: v for k, v in state.items() if k not in stem}, stem


def t3_selection(t3_results: str | Path, placement: str | None = None,
                 variant: str | None = None) -> tuple[str, str, Path | None]:
    """T4's network: (placement, variant, T3's best.pt of it or None). The flags (placement,
    variant) win, then T3's choice (`best_overall` in t3_results, placements.json), then
    serial / plain."""
    chosen, best = {}, None
    path = Path(t3_results)
    if path.is_file():
        try:
            comparison = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            comparison = None
        if not isinstance(comparison, dict) or "best_overall" not in comparison:
            raise ConfigError(f"--t3-results {path} is not T3's placements.json (it has no best_overall); "
                              f"name the placements.json that t3_cubs.py wrote, e.g. runs/t3/placements.json")
        chosen = comparison["best_overall"] or {}  # None: T3 finished no run
    if chosen:
        best = path.parent / f"{chosen['placement']}_{chosen['variant']}" / "best.pt"
    placement = placement or chosen.get("placement", "serial")
    variant = variant or chosen.get("variant", "plain")
    if best is not None and (placement, variant) != (chosen["placement"], chosen["variant"]):
        best = path.parent / f"{placement}_{variant}" / "best.pt"
    return placement, variant, best if best is not None and best.is_file() else None


def t3_block1_size(init: str, t3_best: Path | None, width: int) -> int | None:
    """Block 1's d of the T3 run T4 starts from (--init t3, or auto with a T3 best.pt), read
    from the results.json beside its best.pt, so that every Block 1 tensor loads; None when
    T4 does not start from T3 (the network's default d). A T3 run of another width would
    load nothing but its norms' shapes: refused."""
    results = t3_best.parent / "results.json" if t3_best is not None else None
    if init not in ("auto", "t3") or results is None or not results.is_file():
        return None
    run = json.loads(results.read_text())
    if run.get("width", width) != width:
        raise ConfigError(f"--init {init} starts from the T3 run in {t3_best.parent}, of width "
                          f"{run['width']}; pass --width {run['width']}, or --init scratch")
    return run.get("d")
