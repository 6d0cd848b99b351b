"""Generate a synthetic data set laid out like Herbarium 2021 (FGVC8, Kaggle).

Layout written under OUT_DIR (the real Kaggle layout):

  train/metadata.json   COCO-style: info, licenses, institutions, categories
                        [{id, name, family, order}], images [{id, file_name, width,
                        height, license}], annotations [{id, image_id, category_id,
                        institution_id}] (exactly one per train image)
  train/images/<ccc>/<dd>/<image_id>.jpg
                        ccc = category_id // 100 (3 digits), dd = category_id % 100
  test/metadata.json    info, licenses, images only: like the real test set it is
                        unlabeled (no annotations, no categories)
  test/images/<ccc>/<image_id>.jpg
                        ccc = (image_id // 1000) % 1000 (3 digits)
  test_labels.csv       Id,Category: the true class of every test image, kept outside
                        test/ so that benchmarks can score predictions

Category ids are sparse (drawn from range(100000)); names are unicode binomials with
diacritics and the hybrid sign. Class sizes are long-tailed: every class has >= 3 train
images and the rest follow a Zipf law over a seeded permutation of the classes (with the
defaults, 3.1 images per class, most classes have exactly 3 and the largest 561). Test
images are drawn from the same distribution. Each JPEG shows a class-dependent stripe
pattern (orientation, frequency, colours) and blob, jittered per image, so a CNN can
learn something even at 32x32.

Everything depends only on the arguments (not on --workers): the same arguments give
byte-identical metadata and JPEG files. Output is built in OUT_DIR.tmp-<pid> and renamed
at the end, so an interrupted run leaves nothing behind.
"""
import argparse
import functools
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import time

import numpy as np
from PIL import Image

REAL_TRAIN, REAL_TEST = 2257759, 243020  # Herbarium 2021 image counts
CATEGORY_ID_RANGE = 100000
MIN_PER_CLASS = 3
ZIPF_EXPONENT = 1.0
CC = "http://creativecommons.org/"
LICENSES = [{"id": 0, "name": "Public Domain Dedication", "url": CC + "publicdomain/zero/1.0/"},
            {"id": 1, "name": "Attribution License", "url": CC + "licenses/by/4.0/"},
            {"id": 2, "name": "Attribution-NonCommercial License",
             "url": CC + "licenses/by-nc/4.0/"}]
INSTITUTIONS = ["Synthetic Botanical Garden", "Herbarium Imaginarium", "Museum of Fictive Flora",
                "University of Nowhere Herbarium", "Placeholder Plant Collection"]
SYLLABLES = ["a", "ach", "ill", "é", "ra", "bo", "rë", "al", "cy", "pe", "thal", "ic", "tri",
             "fo", "li", "cal", "gros", "ti", "ca", "rex", "sa", "pi", "quer", "ve", "ró", "ni",
             "hel", "an", "ö", "no", "the", "lu", "pí", "sol", "dá", "go", "mü", "ñu", "ço",
             "stel", "ber", "mon", "ta", "ur", "ø", "la", "vi", "si", "dro", "ket"]
GENUS_ENDINGS = ["a", "ia", "us", "um", "is", "ella", "éa", "odes", "anthus", "ago"]
EPITHET_ENDINGS = ["alis", "ensis", "ica", "oides", "ata", "ëa", "ifolia", "us", "um", "iana"]


# ---------------------------------------------------------------- names and metadata

def _word(rnd, endings, cap=False):
    """One to three random syllables followed by one of the endings (capitalised if cap)."""
    word = "".join(rnd.choice(SYLLABLES) for _ in range(rnd.randint(1, 3))) + rnd.choice(endings)
    return word.capitalize() if cap else word


def _unique(make, seen):
    """A name from make() not in seen (redrawn up to 20 times, then numbered); record it."""
    name = make()
    for _ in range(20):
        if name not in seen:
            break
        name = make()
    base, k = name, 2
    while name in seen:
        name, k = f"{base} {k}", k + 1
    seen.add(name)
    return name


def _author(rnd):
    """A botanical author abbreviation such as 'Farw.', 'L.' or '(Pú.) Stelm. & Ta.'."""
    def abbrev():
        return "L." if rnd.random() < 0.1 else _word(rnd, ["", "r", "sch", "tt"], True) + "."
    r = rnd.random()
    return f"({abbrev()}) {abbrev()}" if r < 0.15 else f"{abbrev()} & {abbrev()}" if r < 0.25 \
        else abbrev()


def make_categories(ids, seed):
    """Build [{id, name, family, order}] for the sorted category ids (order -> family -> genus)."""
    rnd = random.Random(seed * 1000003 + 17)
    n = len(ids)
    seen = set()
    orders = [_unique(lambda: _word(rnd, ["ales"], True), seen) for _ in range(max(1, n // 2000))]
    families = [(_unique(lambda: _word(rnd, ["aceae"], True), seen), rnd.choice(orders))
                for _ in range(max(1, n // 150))]
    genera = [(_unique(lambda: _word(rnd, GENUS_ENDINGS, True), seen), rnd.choice(families))
              for _ in range(max(1, n // 6))]

    def species(genus):  # Genus [×]epithet [subsp./var. epithet] Author
        name = f"{genus} {'×' if rnd.random() < 0.05 else ''}{_word(rnd, EPITHET_ENDINGS)}"
        if rnd.random() < 0.08:
            name += f" {rnd.choice(['subsp.', 'var.'])} {_word(rnd, EPITHET_ENDINGS)}"
        return f"{name} {_author(rnd)}"

    cats = []
    for cid in ids:
        genus, (family, order) = rnd.choice(genera)
        name = _unique(lambda: species(genus), seen)
        cats.append({"id": int(cid), "name": name, "family": family, "order": order})
    return cats


def class_sizes(n_classes, n_images, rng):
    """MIN_PER_CLASS each, plus the rest split by a Zipf law over a random class ranking.

    The split uses largest remainders, so the sizes sum to n_images exactly."""
    rest = n_images - MIN_PER_CLASS * n_classes
    weights = 1.0 / np.arange(1, n_classes + 1) ** ZIPF_EXPONENT
    quota = rest * weights / weights.sum()
    extra = np.floor(quota).astype(np.int64)
    short = rest - int(extra.sum())
    extra[np.argsort(-(quota - extra), kind="stable")[:short]] += 1
    sizes = np.empty(n_classes, dtype=np.int64)
    sizes[rng.permutation(n_classes)] = MIN_PER_CLASS + extra
    return sizes


def write_json(path, obj):
    """Write obj as compact UTF-8 JSON; return the number of bytes written."""
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


# ---------------------------------------------------------------- pixels

# Pixels are palette indices: 7 bits of stripe phase, top bit = blob. A triangle wave of the
# phase blends background -> foreground (index < 128) or shades the blob colour (index >= 128).
_TRIANGLE = 1.0 - np.abs(np.arange(128) / 64.0 - 1.0)
PALETTE_WEIGHTS = np.zeros((256, 3))
PALETTE_WEIGHTS[:128, 0], PALETTE_WEIGHTS[:128, 1] = 1.0 - _TRIANGLE, _TRIANGLE
PALETTE_WEIGHTS[128:, 2] = 0.7 + 0.6 * _TRIANGLE
NOISE_PAD = 64  # images take a (seed, image_id)-chosen crop of a per-size noise bank


def _uniforms(seed, kind, key, n):
    """n uniforms in [0, 1) from a Philox stream keyed by (seed, kind, key); also the generator."""
    rng = np.random.Generator(np.random.Philox(key=(seed << 64) | (kind << 62) | key))
    return rng.random(n), rng


@functools.lru_cache(maxsize=1 << 17)
def class_style(seed, cat_id):
    """The 15 numbers fixing a class's look: stripe angle/frequency/phase, blob, colours."""
    return _uniforms(seed, 1, cat_id, 15)[0]


@functools.lru_cache(maxsize=2)
def noise_bank(seed, width, height):
    """Random bytes of shape (height + NOISE_PAD, width + NOISE_PAD), fixed by the seed."""
    rng = _uniforms(seed, 3, 0, 0)[1]
    shape = (height + NOISE_PAD, width + NOISE_PAD)
    return np.frombuffer(rng.bytes(shape[0] * shape[1]), np.uint8).reshape(shape)


def render(seed, image_id, cat_id, width, height):
    """The RGB image for (seed, image_id, cat_id): a class-styled stripe field plus a blob.

    The class fixes colours, stripe orientation/frequency/phase and the blob position and
    size; the image (seed, image_id) adds a shift, small angle/frequency/phase jitter,
    brightness and pixel noise. Only 1-D arrays and uint8 operations touch every pixel."""
    c = class_style(seed, cat_id)
    j = _uniforms(seed, 2, image_id, 9)[0]
    angle = math.pi * c[0] + (j[0] - 0.5) * 0.15
    freq = (1.5 + 4.5 * c[1]) * (0.95 + 0.1 * j[1]) * 128 / width  # phase steps per pixel
    dx, dy = (j[2] - 0.5) * 0.16 * width, (j[3] - 0.5) * 0.16 * height  # shift in pixels
    phase = 128 * c[2] + (j[4] - 0.5) * 30
    u = (freq * math.cos(angle) * (np.arange(width) - dx) + phase) % 128
    v = (freq * math.sin(angle) * (np.arange(height) - dy)) % 128
    idx = u.astype(np.uint8)[None, :] + v.astype(np.uint8)[:, None]  # < 256
    ox, oy = int(j[5] * NOISE_PAD), int(j[6] * NOISE_PAD)
    noise = noise_bank(seed, width, height)[oy:oy + height, ox:ox + width]
    idx += noise & (3, 7, 15)[int(3 * j[7])]
    idx &= 127  # uint8 wrap-around keeps the phase modulo 128
    r = (0.1 + 0.15 * c[5]) * min(width, height)
    bx, by = (0.2 + 0.6 * c[3]) * width + dx, (0.2 + 0.6 * c[4]) * height + dy
    x0, y0 = max(0, int(bx - r)), max(0, int(by - r))
    x1, y1 = max(x0, min(width, int(bx + r) + 2)), max(y0, min(height, int(by + r) + 2))
    box = idx[y0:y1, x0:x1]
    inside = ((np.arange(x0, x1) - bx) ** 2)[None, :] + ((np.arange(y0, y1) - by) ** 2)[:, None]
    inside = inside < r * r
    np.bitwise_or(box, 128, out=box, where=inside)
    palette = PALETTE_WEIGHTS @ (40 + 190 * c[6:15].reshape(3, 3)) * (0.85 + 0.3 * j[8])
    im = Image.fromarray(idx)
    im.putpalette(np.minimum(palette, 255).astype(np.uint8).tobytes())
    return im.convert("RGB")


def _worker_init():
    """Pool workers leave SIGINT to the parent, which terminates them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_chunk(job):
    """Render and save one chunk of (image_id, category_id, path) jobs; return (count, bytes)."""
    seed, width, height, quality, items = job
    total = 0
    for image_id, cat_id, path in items:
        buf = io.BytesIO()  # one write() per file: file creation dominates for small images
        render(seed, image_id, cat_id, width, height).save(buf, "JPEG", quality=quality)
        with open(path, "wb") as f:
            total += f.write(buf.getbuffer())
    return len(items), total


# ---------------------------------------------------------------- driver

def parse_args(argv):
    """Parse and validate the command line (errors exit with status 2)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="output directory (must not exist or be empty)")
    p.add_argument("--classes", type=int, default=64500,
                   help="number of categories (default 64500)")
    p.add_argument("--images", type=int, default=200000,
                   help="number of TRAIN images, at least 3 per class (default 200000)")
    p.add_argument("--test-images", type=int, default=None,
                   help="number of test images (default round(images * 243020 / 2257759), "
                        "the real test/train ratio); their labels go to OUT_DIR/test_labels.csv")
    p.add_argument("--size", default="32x32",
                   help="image size WxH (default 32x32 for scale tests; 1000x680 is the real "
                        "sheet size, for decode benchmarks)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: CPU count); does not change the output")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it holds an earlier output of this script")
    args = p.parse_args(argv)
    m = re.fullmatch(r"(\d+)x(\d+)", args.size)
    args.width, args.height = (int(m[1]), int(m[2])) if m else (0, 0)
    if args.test_images is None:
        args.test_images = round(args.images * REAL_TEST / REAL_TRAIN)
    args.out_dir = os.path.normpath(args.out_dir)
    exists = os.path.lexists(args.out_dir)
    empty = exists and os.path.isdir(args.out_dir) and not os.listdir(args.out_dir)
    for bad, msg in [
        (not (1 <= args.width <= 65500 and 1 <= args.height <= 65500),
         f"bad --size {args.size!r}: expected WxH, e.g. 32x32 or 1000x680"),
        (not 1 <= args.classes <= CATEGORY_ID_RANGE,
         f"--classes must be in 1..{CATEGORY_ID_RANGE}"),
        (args.images < MIN_PER_CLASS * args.classes,
         f"--images {args.images} < 3 * --classes {args.classes}: "
         "every class needs at least 3 images"),
        (args.test_images < 0, "--test-images must be >= 0"),
        (not 1 <= args.quality <= 100, "--quality must be in 1..100"),
        (not 0 <= args.seed < 2**32, "--seed must be in 0..2**32-1"),
        (args.workers < 1, "--workers must be >= 1"),
        (exists and not empty and not args.force,
         f"{args.out_dir} exists and is not empty (use --force to replace it)"),
        (exists and not empty and not os.path.isfile(
            os.path.join(args.out_dir, "train", "metadata.json")),
         f"{args.out_dir} does not look like an output of this script (no train/metadata.json); "
         "refusing to replace it"),
    ]:
        if bad:
            p.error(msg)
    return args


def build(args, tmp):
    """Write metadata and test_labels.csv into tmp; return (sizes, jobs, bytes written)."""
    rng = np.random.default_rng([args.seed, 0])
    cat_ids = np.sort(rng.choice(CATEGORY_ID_RANGE, args.classes, replace=False))
    sizes = class_sizes(args.classes, args.images, rng)
    train_cats = cat_ids[rng.permutation(np.repeat(np.arange(args.classes), sizes))].tolist()
    test_cats = cat_ids[rng.choice(args.classes, args.test_images, p=sizes / sizes.sum())].tolist()
    lic = rng.integers(0, len(LICENSES), args.images + args.test_images).tolist()
    inst = rng.integers(0, len(INSTITUTIONS), args.images).tolist()
    info = {"year": 2021, "version": "synthetic-1",
            "description": "SYNTHETIC data set shaped like Herbarium 2021 (FGVC8), written by "
                           "bench/herbarium_gen.py "
                           f"--classes {args.classes} --images {args.images} "
                           f"--test-images {args.test_images} --size {args.width}x{args.height} "
                           f"--quality {args.quality} --seed {args.seed}"}
    w, h, n = args.width, args.height, args.images
    # file names: Herbarium 2021's schemes (train by category id, test by image id)
    train_jobs = [(i, c, f"images/{c // 100:03d}/{c % 100:02d}/{i}.jpg")
                  for i, c in enumerate(train_cats)]
    test_jobs = [(i, c, f"images/{(i // 1000) % 1000:03d}/{i}.jpg")
                 for i, c in enumerate(test_cats, start=n)]
    train = {"info": info, "licenses": LICENSES,
             "institutions": [{"id": i, "name": s} for i, s in enumerate(INSTITUTIONS)],
             "categories": make_categories(cat_ids.tolist(), args.seed),
             "images": [{"id": i, "file_name": p, "width": w, "height": h, "license": lic[i]}
                        for i, _, p in train_jobs],
             "annotations": [{"id": i, "image_id": i, "category_id": c, "institution_id": inst[i]}
                             for i, c, _ in train_jobs]}
    test = {"info": info, "licenses": LICENSES,
            "images": [{"id": i, "file_name": p, "width": w, "height": h, "license": lic[i]}
                       for i, _, p in test_jobs]}
    nbytes = 0
    jobs = []
    for split, meta, split_jobs in (("train", train, train_jobs), ("test", test, test_jobs)):
        root = os.path.join(tmp, split)
        for d in sorted({os.path.dirname(p) for _, _, p in split_jobs}):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        os.makedirs(root, exist_ok=True)
        nbytes += write_json(os.path.join(root, "metadata.json"), meta)
        jobs += [(i, c, os.path.join(root, p)) for i, c, p in split_jobs]
    csv = "Id,Category\n" + "".join(f"{i},{c}\n" for i, c, _ in test_jobs)
    with open(os.path.join(tmp, "test_labels.csv"), "w", encoding="utf-8", newline="") as f:
        nbytes += f.write(csv)
    return sizes, jobs, nbytes


def write_images(args, jobs):
    """Render all jobs with a process pool, printing progress; return JPEG bytes written."""
    per_chunk = max(1, min(1000, 8_000_000 // (args.width * args.height),
                           math.ceil(len(jobs) / (4 * args.workers))))
    chunks = [(args.seed, args.width, args.height, args.quality, jobs[k:k + per_chunk])
              for k in range(0, len(jobs), per_chunk)]
    done = nbytes = 0
    start = last = time.monotonic()
    # leaving the with block (also by an exception) terminates the workers and waits for them
    with multiprocessing.Pool(args.workers, initializer=_worker_init) as pool:
        for count, size in pool.imap_unordered(write_chunk, chunks):
            done, nbytes = done + count, nbytes + size
            now = time.monotonic()
            if now - last >= 3 or done == len(jobs):
                last = now
                print(f"  {done}/{len(jobs)} images, {done / max(now - start, 1e-9):.0f} img/s",
                      file=sys.stderr, flush=True)
    return nbytes


def main(argv=None):
    """Generate the data set into a temp dir, then move it to OUT_DIR."""
    args = parse_args(argv)
    start = time.monotonic()
    tmp = f"{args.out_dir}.tmp-{os.getpid()}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        os.makedirs(tmp)
        sizes, jobs, nbytes = build(args, tmp)
        print(f"herbarium_gen: metadata written, rendering {len(jobs)} images "
              f"({args.width}x{args.height}) with {args.workers} workers", file=sys.stderr)
        nbytes += write_images(args, jobs)
        if os.path.isdir(args.out_dir) and not os.path.islink(args.out_dir):
            shutil.rmtree(args.out_dir)  # empty, or --force
        elif os.path.lexists(args.out_dir):
            os.remove(args.out_dir)
        os.rename(tmp, args.out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            print("herbarium_gen: interrupted, nothing written", file=sys.stderr)
            return 130
        raise
    top = ", ".join(str(s) for s in np.sort(sizes)[::-1][:5])
    print(f"herbarium_gen: {args.out_dir}: {args.classes} classes, {args.images} train images, "
          f"{args.test_images} test images; class size min/median/max "
          f"{sizes.min()}/{np.median(sizes):g}/{sizes.max()} (largest: {top}); "
          f"{nbytes / 1e6:.1f} MB in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
