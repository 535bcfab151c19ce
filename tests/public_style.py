"""A public-style dataset: Alpaca rows that turn a paragraph of natural text into JSON.

Shaped like the 2,379-row alpaca extraction set of issue 15 (there: median 376 tokens with
the chat template, 99th percentile 751, max 933). Here, with the SmolLM2 tokenizer and 300
rows: median about 445, 99th percentile about 722, max 762, and over a fifth of the rows
(26%) longer than 512 tokens. Paragraph lengths are drawn from a seeded log-normal. Written here; every name and sentence is
generated, nothing is copied from a real dataset.
"""

from __future__ import annotations

import json
import random

NAMES = ["Ana Ruiz", "Ben Okafor", "Chen Wei", "Dana Novak", "Emil Larsen", "Fatima Zahra", "Goran Ilic", "Hana Sato"]
CITIES = ["Lisbon", "Lagos", "Chengdu", "Prague", "Aarhus", "Rabat", "Split", "Osaka"]
ITEMS = ["lamp", "kettle", "chair", "bicycle", "printer", "guitar", "tent", "camera", "desk", "blender"]
FILLER = [
    "The weather that week had been unusually mild for the season, and the streets were busy until late.",
    "A neighbour mentioned that the shop on the corner had changed owners twice in the last year.",
    "Nobody in the family remembered exactly when the old warehouse by the river had been closed.",
    "The delivery driver took a longer route because a bridge was being repaired after the storm.",
    "Several people in the queue were talking about the football match that had ended in a draw.",
    "The local newspaper had printed a short article about the new tram line the day before.",
    "It was the kind of afternoon when everyone seemed to be carrying an umbrella just in case.",
    "The receipt was folded twice and tucked into the side pocket of a worn leather bag.",
]
INSTRUCTION = "Extract the customer's name, city, order date and the items bought from the text. Answer with JSON only."


def json_extraction_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        items = sorted(rng.sample(ITEMS, rng.randint(1, 3)))
        facts = [
            f"{name} lives in {city}.",
            f"On {date} {name.split()[0]} placed order number {1000 + i}.",
            f"The order contained: {', '.join(items)}.",
        ]
        filler = [rng.choice(FILLER) for _ in range(max(1, int(rng.lognormvariate(2.85, 0.3))))]
        sentences = filler + facts
        rng.shuffle(sentences)
        output = json.dumps({"name": name, "city": city, "date": date, "items": items})
        rows.append({"instruction": INSTRUCTION, "input": " ".join(sentences), "output": output})
    return rows


PRODUCTS = [
    ("KT", "stainless steel kettle 1.7 l"), ("LP", "brass desk lamp with linen shade"), ("CH", "oak dining chair"),
    ("BK", "city bicycle, 7 gears"), ("PR", "laser printer, duplex"), ("GT", "acoustic guitar with case"),
    ("TN", "two-person trekking tent"), ("CM", "mirrorless camera body"), ("DK", "standing desk frame"),
    ("BL", "high-speed blender 1.5 l"), ("MG", "ceramic mug set of four"), ("PN", "cast iron frying pan 28 cm"),
]
CURRENCIES = ["EUR", "USD", "GBP"]
ORDER_INSTRUCTION = (
    "Extract the purchase order from the email as JSON with the keys order_id, customer (name, email, city), "
    "date, currency, items (sku, product, quantity, unit_price) and total. Answer with JSON only."
)


def order_extraction_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose answers are purchase orders of 1-19 line items: JSON answers of about 100-900 tokens.

    The shape of a real extraction set (a request in prose, the whole record as JSON), where a
    fixed 32-token generation budget or a 256-token row limit would cut every answer.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        email = name.lower().replace(" ", ".") + "@example.com"
        date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        currency = rng.choice(CURRENCIES)
        items = []
        for _ in range(rng.randint(1, 19)):
            code, product = rng.choice(PRODUCTS)
            items.append({"sku": f"{code}-{rng.randint(1000, 9999)}", "product": product,
                          "quantity": rng.randint(1, 9), "unit_price": round(rng.uniform(3, 400), 2)})
        total = round(sum(it["quantity"] * it["unit_price"] for it in items), 2)
        lines = [f"{it['quantity']} x {it['product']} (SKU {it['sku']}) at {it['unit_price']:.2f} {currency} each."
                 for it in items]
        text = (f"Hello, this is {name} from {city} ({email}). {rng.choice(FILLER)} I would like to confirm order "
                f"PO-{20000 + i}, placed on {date}: " + " ".join(lines) + f" That makes {total:.2f} {currency} in total. "
                + rng.choice(FILLER))
        answer = {"order_id": f"PO-{20000 + i}", "customer": {"name": name, "email": email, "city": city}, "date": date,
                  "currency": currency, "items": items, "total": total}
        rows.append({"instruction": ORDER_INSTRUCTION, "input": text, "output": json.dumps(answer)})
    return rows
