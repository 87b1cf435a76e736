"""Writes the demo catalogs committed beside this file: `python catalogs/make_demo.py`.

demo_prompts.parquet: 24 prompts of the kind a training set is made from, with a few per-row
overrides. demo_products.parquet: 12 products with the fields an e-commerce catalog has
(prompts for them come from templates, see the product-imagery stage). demo_photos.parquet: six
of those products with a photo each (`image`, a path relative to this folder), drawn here with
PIL as flat shapes on plain backgrounds, so remove_bg has something to cut out offline. styles/*.png: small style
references for the style stage (configs/products.yaml), drawn in code.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

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


# --- product photos -------------------------------------------------------------------------------

PHOTO_SIZE = (160, 160)


def _mug(draw: ImageDraw.ImageDraw) -> None:
    draw.ellipse((102, 62, 138, 108), outline=(196, 160, 110), width=9)  # handle
    draw.rounded_rectangle((40, 48, 112, 130), radius=10, fill=(214, 178, 128))  # body
    draw.ellipse((40, 40, 112, 56), fill=(170, 136, 92))  # rim


def _teapot(draw: ImageDraw.ImageDraw) -> None:
    draw.polygon([(112, 92), (146, 62), (150, 68), (120, 106)], fill=(40, 40, 44))  # spout
    draw.arc((14, 70, 56, 118), 90, 270, fill=(40, 40, 44), width=8)  # handle
    draw.ellipse((32, 64, 124, 136), fill=(52, 52, 58))  # body
    draw.ellipse((64, 48, 92, 70), fill=(40, 40, 44))  # lid


def _tote(draw: ImageDraw.ImageDraw) -> None:
    draw.arc((52, 20, 108, 80), 180, 360, fill=(92, 60, 36), width=6)  # handles
    draw.polygon([(36, 52), (124, 52), (134, 140), (26, 140)], fill=(96, 110, 60))  # bag


def _lamp(draw: ImageDraw.ImageDraw) -> None:
    draw.ellipse((48, 128, 112, 142), fill=(176, 140, 60))  # base
    draw.line((80, 134, 62, 84, 98, 48), fill=(176, 140, 60), width=6)  # arm
    draw.polygon([(84, 30), (124, 30), (138, 62), (70, 62)], fill=(196, 160, 72))  # shade


def _bottle(draw: ImageDraw.ImageDraw) -> None:
    draw.rounded_rectangle((58, 44, 102, 142), radius=14, fill=(232, 112, 32))  # body
    draw.rectangle((68, 24, 92, 46), fill=(60, 60, 60))  # cap


def _planter(draw: ImageDraw.ImageDraw) -> None:
    draw.ellipse((54, 30, 106, 78), fill=(70, 140, 60))  # plant
    draw.polygon([(42, 70), (118, 70), (106, 132), (54, 132)], fill=(196, 104, 64))  # pot
    draw.rectangle((38, 66, 122, 78), fill=(176, 92, 56))  # rim


# id -> (drawing, background); backgrounds are plain and far from the product's colours.
PHOTOS = {
    "MUG-001": (_mug, (236, 240, 244)),
    "TEA-002": (_teapot, (242, 238, 230)),
    "BAG-003": (_tote, (238, 234, 226)),
    "LMP-005": (_lamp, (222, 228, 236)),
    "BTL-008": (_bottle, (240, 242, 240)),
    "PLT-010": (_planter, (236, 238, 242)),
}


def draw_photo(product_id: str) -> Image.Image:
    """A product photo made in code: a flat drawing of the product on a plain background."""
    drawing, background = PHOTOS[product_id]
    image = Image.new("RGB", PHOTO_SIZE, background)
    drawing(ImageDraw.Draw(image))
    return image


def photos_table() -> pa.Table:
    """The products that have a photo, with `image` as a path relative to this folder."""
    products = {row[0]: row for row in PRODUCTS}
    ids = list(PHOTOS)
    return pa.table(
        {
            "id": ids,
            "sku": ids,
            "title": [products[i][1] for i in ids],
            "category": [products[i][3] for i in ids],
            "color": [products[i][5] for i in ids],
            "image": [f"photos/{i}.png" for i in ids],
        }
    )


def write_photos() -> None:
    (HERE / "photos").mkdir(exist_ok=True)
    for product_id in PHOTOS:
        draw_photo(product_id).save(HERE / "photos" / f"{product_id}.png", optimize=True)


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
    write_photos()
    pq.write_table(photos_table(), HERE / "demo_photos.parquet")
    (HERE / "styles").mkdir(exist_ok=True)
    for name, image in style_images().items():
        image.save(HERE / "styles" / f"{name}.png", optimize=True)
    print("wrote", HERE / "demo_prompts.parquet", HERE / "demo_products.parquet", HERE / "demo_photos.parquet",
          "and", HERE / "photos", "and", HERE / "styles")
