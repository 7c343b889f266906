"""The check of a user's ``--base DIR`` text-to-image folder, before anything in it is loaded: a
``StableDiffusionPipeline.save_pretrained`` folder of the classes dataward composes (what does not fit is refused by
name), safetensors weights only (a pickle-format file anywhere in it is refused, never opened), and a
:class:`BaseDescription` of it: each component's class, config and parameter count (from the safetensors headers) and
one SHA-256 over every file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from dataward.errors import DatawardError, echo
from dataward.store.checkpoints import file_sha256

PIPELINE_CLASS = "StableDiffusionPipeline"
MODEL_COMPONENTS = {  # component -> (library, class, config file)
    "vae": ("diffusers", "AutoencoderKL", "config.json"),
    "unet": ("diffusers", "UNet2DConditionModel", "config.json"),
    "text_encoder": ("transformers", "CLIPTextModel", "config.json"),
}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
SCHEDULER_CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler")
ABSENT_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")  # must be null: dataward loads none of them
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")  # weights formats that unpickle when loaded


@dataclass(frozen=True)
class ComponentDescription:
    """One component of a base pipeline folder."""

    class_name: str  # e.g. "UNet2DConditionModel"
    config: dict  # its saved config (config.json, scheduler_config.json or tokenizer_config.json)
    parameters: int  # parameter count from its safetensors headers (0 for the tokenizer and the scheduler)


@dataclass(frozen=True)
class BaseDescription:
    """What a base folder holds, recorded when it is taken: compared later to notice a changed base."""

    sha256: str  # over every file: sorted relative paths and each file's SHA-256
    components: dict[str, ComponentDescription]  # vae, unet, text_encoder, tokenizer, scheduler

    def parameters(self) -> int:
        """Parameters of all the networks together."""
        return sum(c.parameters for c in self.components.values())


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatawardError(f"base folder is missing {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatawardError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DatawardError(f"{path} must hold a JSON object")
    return data


def _refuse_pickles(folder: Path) -> list[Path]:
    """Every file below ``folder`` (sorted), after refusing any pickle-format weights file by name."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    pickles = [p.relative_to(folder).as_posix() for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise DatawardError(f"base folder {folder} holds pickle-format file(s) {', '.join(pickles[:3])}: dataward never loads "
                            f"pickles; save the pipeline with save_pretrained(..., safe_serialization=True) and remove them")
    return files


def _component_class(index: dict, name: str, folder: Path) -> str | None:
    """The class model_index.json names for component ``name`` (None when it is null or absent)."""
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
        raise DatawardError(f"{folder / 'model_index.json'}: component {name!r} must be [library, class], got {echo(json.dumps(entry))}")
    return entry[1]


def _parameters(component: Path) -> int:
    """Parameters in the component folder's safetensors files, read from their headers (no tensor is loaded)."""
    files = sorted(component.glob("*.safetensors"))
    if not files:
        raise DatawardError(f"base component {component} has no .safetensors weights")
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for side in shape:
                    count *= side
                total += count
    return total


def _describe_component(folder: Path, index: dict, name: str, expected: tuple[str, ...], config_file: str, weights: bool) -> ComponentDescription:
    found = _component_class(index, name, folder)
    if found is None:
        raise DatawardError(f"base folder {folder} has no {name!r} component (model_index.json): a text-to-image base needs "
                            f"vae, unet, text_encoder, tokenizer and scheduler")
    if found not in expected:
        raise DatawardError(f"base component {name!r} is a {echo(found)}: dataward takes {' or '.join(expected)} there")
    config = _read_json(folder / name / config_file)
    return ComponentDescription(found, config, _parameters(folder / name) if weights else 0)


def _check_shapes(folder: Path, components: dict[str, ComponentDescription]) -> None:
    """The components fit together: the UNet's inputs are the autoencoder's latents, it attends to the text encoder."""
    unet, vae, text = (components[n].config for n in ("unet", "vae", "text_encoder"))
    if unet.get("in_channels") != vae.get("latent_channels") or unet.get("out_channels") != vae.get("latent_channels"):
        raise DatawardError(f"base folder {folder}: the unet takes {unet.get('in_channels')} channels but the vae's latents have "
                            f"{vae.get('latent_channels')}")
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        raise DatawardError(f"base folder {folder}: the unet's cross_attention_dim {unet.get('cross_attention_dim')} is not the "
                            f"text_encoder's hidden_size {text.get('hidden_size')}")


def check_base(folder: str | Path) -> BaseDescription:
    """Check a ``StableDiffusionPipeline`` folder without loading it (see the module docstring); its description."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatawardError(f"base folder {folder} does not exist or is not a folder")
    files = _refuse_pickles(folder)
    index = _read_json(folder / "model_index.json")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise DatawardError(f"base folder {folder} holds a {echo(str(index.get('_class_name')))}: dataward takes a {PIPELINE_CLASS} folder here")
    present = [name for name in ABSENT_COMPONENTS if _component_class(index, name, folder) is not None]
    if present:
        raise DatawardError(f"base folder {folder} has a {present[0]!r} component: dataward loads none; save the pipeline with "
                            f"{present[0]}=None (and requires_safety_checker=False)")
    components = {name: _describe_component(folder, index, name, (cls,), config, True) for name, (_, cls, config) in MODEL_COMPONENTS.items()}
    components["tokenizer"] = _describe_component(folder, index, "tokenizer", TOKENIZER_CLASSES, "tokenizer_config.json", False)
    components["scheduler"] = _describe_component(folder, index, "scheduler", SCHEDULER_CLASSES, "scheduler_config.json", False)
    _check_shapes(folder, components)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return BaseDescription(digest.hexdigest(), components)
