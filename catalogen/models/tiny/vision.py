"""Tiny models for the image stages after generation: background removal, captioning, scoring.

Like `catalogen.models.tiny.profile`, each builder writes a model in its standard on-disk format, so a stage loads
it through exactly the API it uses for the real model:

- `rembg`: an ONNX segmentation model for rembg's `u2net_custom` session (open it with
  `rembg_session`). Its mask is meaningful, not random: a pixel is foreground when its colour is
  far from the image's border colour, so tests can check that a shape on a plain background is cut out.
- `blip2`: a `Blip2ForConditionalGeneration` with an OPT language model, and its `Blip2Processor`
  (a byte-level BPE tokenizer trained here on a few sentences). Captions are noise made of word pieces.
- `clip`: a `CLIPModel` and `CLIPProcessor`, for an image-text agreement score.
- `aesthetic`: the LAION aesthetic predictor's MLP head (catalogen.models.aesthetic) over the tiny
  CLIP's 32-dim embedding, as one safetensors file; random, stretched so images differ by a point or so.

Weights come from a fixed torch seed, so every machine builds byte-identical files.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from catalogen.models.rembg import u2net_home

if TYPE_CHECKING:
    from rembg.sessions.base import BaseSession

REMBG_MODEL_FILE = "tiny-rembg.onnx"
REMBG_GRAPH_NAME = "catalogen_tiny_rembg"  # how a loaded session tells it holds this model

# rembg's u2net_custom session feeds the network a 320x320 image normalised with these (ImageNet) values.
_REMBG_SIZE = 320
_REMBG_MEAN = (0.485, 0.456, 0.406)
_REMBG_STD = (0.229, 0.224, 0.225)

# BLIP-2: the special tokens sit where OPT's do (ids 0 to 3), and the processor adds `<image>` after the vocabulary.
_OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_NUM_QUERY_TOKENS = 4
_IMAGE_SIZE = 32
# Random weights at the usual 0.02 scale give every image the same caption; at 0.5 the image shows.
_INIT_RANGE = 0.5

# The tiny CLIP's embedding width, and the aesthetic head over it: the published head's depth, narrower.
_CLIP_PROJECTION = 32
_AESTHETIC_SIZES = (_CLIP_PROJECTION, 64, 32, 16, 8, 1)
_AESTHETIC_CENTRE = 5.0  # a zero embedding's score: the middle of the AVA scale the real head rates on
_AESTHETIC_GAIN = 250.0  # stretches the random head's output, so images differ by a point or so

# Printable ASCII as byte-level BPE spells it (the space byte is "Ġ").
_PRINTABLE_BYTES = [chr(code) for code in range(0x21, 0x7F)] + ["Ġ"]
# What the BLIP-2 tokenizer learns its merges from: captions like the ones the stage will write.
_CORPUS = """\
a photo of a red chair on a white background
a blue ceramic mug with a handle, studio lighting
a pair of black leather shoes on a wooden floor
a green glass bottle standing on a table
a white cotton t-shirt folded on a grey background
a silver watch with a metal strap, close up
a wooden table with four legs in a bright room
a yellow sofa with two cushions next to a window
a brown leather bag with a gold buckle
a product photo of a lamp with a round shade
an orange backpack with many pockets
the red dress is made of silk and has long sleeves
there is a small plant in a white pot on the shelf
a close up photo of a running shoe in blue and white
a set of kitchen knives on a dark stone counter
"""


# --- rembg ---------------------------------------------------------------------------------------


class BorderContrastSegmenter(torch.nn.Module):
    """A foreground mask from colour alone: how far each pixel is from the mean colour of the border.

    Input is what rembg's `u2net_custom` session feeds a network (a 1x3x320x320 image scaled by its
    brightest value, then normalised with ImageNet mean and std); output is a 1x1x320x320 map in [0, 1].

    rembg min-max normalises that map, so a constant map (an image with no foreground) would divide
    zero by zero. When the map has no foreground, its top-left pixel is raised to 1 instead: the mask
    is empty but for that corner (faint once resized down to a small image, a few pixels on a large one).
    """

    def __init__(self, border: int = 8, threshold: float = 0.2, steepness: float = 60.0):
        super().__init__()
        self.border = border
        self.threshold = threshold  # colour distance, RGB in [0, 1], where foreground starts
        self.steepness = steepness
        self.register_buffer("mean", torch.tensor(_REMBG_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_REMBG_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image * self.std + self.mean  # undo rembg's normalisation
        distance = (rgb - self._border_colour(rgb)).square().sum(dim=1, keepdim=True).sqrt()
        mask = torch.sigmoid(self.steepness * (distance - self.threshold))
        return self._mark_empty(mask)

    def _border_colour(self, rgb: torch.Tensor) -> torch.Tensor:
        b = self.border
        strips = [rgb[:, :, :b, :], rgb[:, :, -b:, :], rgb[:, :, b:-b, :b], rgb[:, :, b:-b, -b:]]
        pixels = torch.cat([strip.flatten(2) for strip in strips], dim=2)
        return pixels.mean(dim=2).view(-1, 3, 1, 1)

    def _mark_empty(self, mask: torch.Tensor) -> torch.Tensor:
        peak = mask.amax(dim=(2, 3), keepdim=True)
        height, width = mask.shape[2], mask.shape[3]
        corner = F.pad(1.0 - peak, (0, width - 1, 0, height - 1))  # 1 - peak at (0, 0), zero elsewhere
        return torch.maximum(mask, corner)


def _strip_source_metadata(model) -> None:
    """Drop the exporter's per-node notes: they hold this file's absolute path, which differs by machine."""
    import onnx_ir

    model.graph.metadata_props.clear()
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notes that torchvision is missing (this model needs none of its operators)."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        exporter_log.setLevel(level)


def build_rembg(folder: Path, cache_dir: Path) -> None:
    """Export `BorderContrastSegmenter` to `<folder>/tiny-rembg.onnx` for rembg's u2net_custom session."""
    example = torch.zeros(1, 3, _REMBG_SIZE, _REMBG_SIZE)
    with _quiet_exporter():
        program = torch.onnx.export(
            BorderContrastSegmenter().eval(),
            (example,),
            input_names=["input"],
            output_names=["mask"],
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    _strip_source_metadata(program.model)
    program.model.graph.name = REMBG_GRAPH_NAME
    program.save(str(Path(folder) / REMBG_MODEL_FILE))


def rembg_session(folder: Path, providers: list | None = None) -> BaseSession:
    """Open the tiny model in `folder` with rembg's own `new_session("u2net_custom", model_path=...)`.

    rembg 2.0.86 refuses a `model_path` outside its home, which it reads from `U2NET_HOME` while the
    session is created. So `U2NET_HOME` points at `folder` for that call only (see `u2net_home`); a
    process that only ever uses this model may instead set `U2NET_HOME=<folder>` itself.
    `u2net_custom` never downloads. `providers` is passed to onnxruntime; None lets rembg choose.
    """
    from rembg import new_session

    model_path = Path(folder).resolve() / REMBG_MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"no tiny rembg model at {model_path}; build it with ensure_tiny('rembg', cache_dir)")
    options = {} if providers is None else {"providers": list(providers)}
    with u2net_home(model_path.parent):
        return new_session("u2net_custom", model_path=str(model_path), **options)


# --- BLIP-2 --------------------------------------------------------------------------------------


def _opt_tokenizer():
    """An OPT-style tokenizer: byte-level BPE (GPT-2's scheme) trained on `_CORPUS`, `</s>` as BOS and EOS.

    Its base alphabet is printable ASCII and the space, not all 256 bytes, so whatever a random model
    generates decodes to printable text. The price: other characters in a prompt are dropped.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(_OPT_SPECIALS),
        initial_alphabet=_PRINTABLE_BYTES,
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    return GPT2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=_bpe_merges(bpe),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        padding_side="left",  # a decoder-only model continues from the right end of each prompt
        extra_special_tokens=["<s>"],  # OPT's unused id 0: never part of a decoded caption
    )


def _bpe_merges(bpe) -> list[tuple[str, str]]:
    """The trained merges, as the (left, right) pairs `GPT2Tokenizer` takes; `tokenizers` exposes them only in JSON."""
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(pair) for pair in merges]


def _blip2_config(tokenizer, image_token_id: int):
    """Vision, Q-Former and OPT configs at the smallest sizes that still run every code path."""
    from transformers import Blip2Config

    small = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        initializer_range=_INIT_RANGE,
    )
    return Blip2Config(
        vision_config=dict(small, image_size=_IMAGE_SIZE, patch_size=8),
        qformer_config=dict(small, encoder_hidden_size=32, cross_attention_frequency=1),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tokenizer),
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            init_std=_INIT_RANGE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=_NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
        initializer_range=_INIT_RANGE,
    )


def build_blip2(folder: Path, cache_dir: Path) -> None:
    """A tiny BLIP-2 (ViT, Q-Former, OPT) and its processor, as `Salesforce/blip2-opt-*` are laid out."""
    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
    )

    tokenizer = _opt_tokenizer()
    image_processor = BlipImageProcessorPil(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})
    # The processor adds `<image>` to the tokenizer; the model must know its id.
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=_NUM_QUERY_TOKENS)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(_blip2_config(processor.tokenizer, image_token_id))
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


# --- CLIP ----------------------------------------------------------------------------------------


def build_clip(folder: Path, cache_dir: Path) -> None:
    """A tiny `CLIPModel` and `CLIPProcessor`, sharing the character-level tokenizer of the SD pipelines."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from catalogen.models.tiny.profile import (
        _clip_tokenizer,  # here, not at the top: catalogen.tiny imports this module
    )

    tokenizer = _clip_tokenizer()
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(
            small,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(small, image_size=_IMAGE_SIZE, patch_size=8),
        projection_dim=_CLIP_PROJECTION,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def build_aesthetic(folder: Path, cache_dir: Path) -> None:
    """The aesthetic head over the tiny CLIP's embeddings, saved as `model.safetensors` with the
    published head's tensor names."""
    from safetensors.torch import save_file

    from catalogen.models.aesthetic import AestheticHead

    torch.manual_seed(0)
    head = AestheticHead(_AESTHETIC_SIZES)
    with torch.no_grad():
        head.layers[-1].weight.mul_(_AESTHETIC_GAIN)
        offset = head(torch.zeros(1, _CLIP_PROJECTION))[0]  # what the biases add up to
        head.layers[-1].bias.add_(_AESTHETIC_CENTRE - offset)
    state = {name: tensor.contiguous() for name, tensor in head.state_dict().items()}
    save_file(state, str(Path(folder) / "model.safetensors"))
