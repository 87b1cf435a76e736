"""Writes the demo catalogs committed beside this file: `python catalogs/make_demo.py`.

demo_prompts.parquet: 24 prompts of the kind a training set is made from, with a few per-row
overrides. demo_products.parquet: 12 products with the fields an e-commerce catalog has
(prompts for them come from templates, see the product-imagery stage). styles/*.png: small style
references for the style stage (configs/products.yaml), drawn in code.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).parent

PROMPTS = [
    "a red fox sitting in fresh snow at dawn, wildlife photography",
    "a ceramic teapot on a wooden table, soft window light, still life",
    "an aerial view of terraced rice fields after rain",
    "a lighthouse on a rocky coast during a storm, oil painting",
    "a bowl of ramen with a soft-boiled egg, overhead shot",
    "a vintage bicycle leaning against a yellow wall in Lisbon",
    "a snow leopard on a cliff, telephoto, shallow depth of field",
    "a cozy reading nook with a cat asleep on a blanket",
    "a futuristic city skyline at night with neon reflections in the rain",
    "watercolor illustration of a hummingbird and hibiscus flowers",
    "a stack of pancakes with blueberries and maple syrup",
    "an astronaut floating above the earth, cinematic lighting",
    "a misty pine forest at sunrise with rays of light",
    "a hand-thrown stoneware mug, studio product photo on white",
    "a medieval castle on a hill, autumn colors, wide angle",
    "a macro photo of a dewdrop on a leaf",
    "an old fisherman mending nets on a pier, black and white portrait",
    "a desert road stretching to the horizon under a starry sky",
    "a bustling night market with lanterns and food stalls",
    "isometric pixel art of a tiny island with a windmill",
    "a golden retriever puppy playing in autumn leaves",
    "a glass of iced coffee on a marble counter, morning light",
    "a steam locomotive crossing a stone viaduct in the mountains",
    "a minimalist living room with a green sofa and large plants",
]


def prompts_table() -> pa.Table:
    n = len(PROMPTS)
    negative = [None] * n
    negative[3] = "blurry, low contrast"
    negative[11] = "text, watermark"
    scheduler = [None] * n
    scheduler[4], scheduler[9], scheduler[19] = "euler_a", "dpm++_2m_karras", "ddim"
    seed = [None] * n
    seed[0], seed[7] = 42, 1234567
    steps = [None] * n
    steps[13] = 30
    guidance = [None] * n
    guidance[9] = 5.0
    variants = [None] * n
    variants[20] = 2
    return pa.table(
        {
            "id": [f"prompt-{i:03d}" for i in range(n)],
            "prompt": PROMPTS,
            "negative_prompt": pa.array(negative, pa.string()),
            "scheduler": pa.array(scheduler, pa.string()),
            "seed": pa.array(seed, pa.int64()),
            "steps": pa.array(steps, pa.int32()),
            "guidance_scale": pa.array(guidance, pa.float64()),
            "num_variants": pa.array(variants, pa.int32()),
            "source": ["demo"] * n,  # an unknown column: passes through to the results untouched
        }
    )


PRODUCTS = [
    ("MUG-001", "Stoneware Coffee Mug", "Hand-glazed 350 ml mug with a speckled finish", "kitchen", "Northfold", "sand", "stoneware"),
    ("TEA-002", "Cast Iron Teapot", "1.2 l teapot with enamel interior and stainless infuser", "kitchen", "Kettleworth", "black", "cast iron"),
    ("BAG-003", "Waxed Canvas Tote", "Everyday tote with leather handles and inner pocket", "bags", "Harbor & Pine", "olive", "waxed canvas"),
    ("SHO-004", "Trail Running Shoe", "Lightweight shoe with a grippy lugged outsole", "footwear", "Ridgeline", "blue", "mesh"),
    ("LMP-005", "Brass Desk Lamp", "Adjustable arm lamp with a warm LED bulb", "lighting", "Lumen Co", "brass", "brass"),
    ("CHR-006", "Oak Dining Chair", "Solid oak chair with a woven paper-cord seat", "furniture", "Tallwood", "natural", "oak"),
    ("WAT-007", "Field Watch 38mm", "Automatic field watch with a sapphire crystal", "accessories", "Meridian", "green", "stainless steel"),
    ("BTL-008", "Insulated Water Bottle", "750 ml double-wall bottle, keeps drinks cold 24 h", "outdoor", "Summit", "orange", "stainless steel"),
    ("SCF-009", "Merino Wool Scarf", "Soft ribbed scarf in fine merino wool", "apparel", "Fenwick", "charcoal", "merino wool"),
    ("PLT-010", "Terracotta Planter", "Handmade planter with drainage hole and saucer", "garden", "Clayhouse", "terracotta", "terracotta"),
    ("HDP-011", "Wireless Headphones", "Over-ear headphones with active noise cancelling", "electronics", "Sonora", "white", "aluminium"),
    ("BLK-012", "Linen Throw Blanket", "Stonewashed linen throw with fringed edges", "home", "Northfold", "rust", "linen"),
]


def products_table() -> pa.Table:
    columns = list(zip(*PRODUCTS))
    return pa.table(
        {
            "id": list(columns[0]),
            "sku": list(columns[0]),
            "title": list(columns[1]),
            "description": list(columns[2]),
            "category": list(columns[3]),
            "brand": list(columns[4]),
            "color": list(columns[5]),
            "material": list(columns[6]),
        }
    )


STYLE_SIZE = 64


def _gradient(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> np.ndarray:
    """A vertical blend from `top` to `bottom`, (STYLE_SIZE, STYLE_SIZE, 3) uint8."""
    t = np.linspace(0.0, 1.0, STYLE_SIZE)[:, None, None]
    column = (1 - t) * np.array(top) + t * np.array(bottom)
    return np.broadcast_to(column, (STYLE_SIZE, STYLE_SIZE, 3)).round().astype(np.uint8)


def style_images() -> dict[str, Image.Image]:
    """Three brand looks: a warm sunset gradient, cool diagonal stripes, sage polka dots on cream."""
    y, x = np.mgrid[0:STYLE_SIZE, 0:STYLE_SIZE]
    warm = _gradient((250, 170, 90), (200, 70, 110))
    stripes = np.where(((x + y) // 8 % 2 == 0)[..., None], np.array([40, 90, 170]), np.array([225, 235, 245]))
    dots = ((x % 16 - 8) ** 2 + (y % 16 - 8) ** 2) < 16
    sage = np.where(dots[..., None], np.array([120, 150, 110]), np.array([245, 238, 220]))
    return {
        "warm-gradient": Image.fromarray(warm),
        "cool-stripes": Image.fromarray(stripes.astype(np.uint8)),
        "sage-dots": Image.fromarray(sage.astype(np.uint8)),
    }


if __name__ == "__main__":
    pq.write_table(prompts_table(), HERE / "demo_prompts.parquet")
    pq.write_table(products_table(), HERE / "demo_products.parquet")
    (HERE / "styles").mkdir(exist_ok=True)
    for name, image in style_images().items():
        image.save(HERE / "styles" / f"{name}.png", optimize=True)
    print("wrote", HERE / "demo_prompts.parquet", HERE / "demo_products.parquet", "and", HERE / "styles")
