#!/usr/bin/env python3
"""Render a `sac --timeline` trace as a PNG Gantt chart (one lane per rank and thread).

`sac train --timeline FILE` and `sac evaluate --timeline FILE` write a Chrome trace (Trace
Event Format, JSON) that Perfetto opens; this script draws it as a picture, e.g. for the README:

    .venv/bin/python scripts/timeline_png.py trace.json timeline.png
    .venv/bin/python scripts/timeline_png.py trace.json zoom.png --from 0.5 --to 0.8 \\
        --width 2000 --title "4 ranks, 2 hosts"

--from/--to pick a window in seconds since the trace's first event (default: all of it).
Spans nested in another span of the same thread are drawn as thinner bars inside it. The script
also prints a Markdown table of each lane's self time per category (the time in its innermost
spans) in the window, and its share of the window. Needs only the standard library and Pillow.
"""
import argparse
import json
import math
import signal
import sys

from PIL import Image, ImageDraw, ImageFont

COLOURS = {  # category -> fill colour; unknown categories are grey
    "data": "#4e79a7", "compute": "#f28e2b", "exchange": "#e15759",
    "optimizer": "#76b7b2", "validation": "#59a14f", "checkpoint": "#edc948",
    "loader": "#b07aa1", "read": "#ff9da7", "decode": "#9c755f",
    "normalize": "#17becf", "predict": "#8cd17d", "send": "#a0cbe8",
    "wait": "#d7b5a6",
}
GREY = "#a0a0a0"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
PAD, MARGIN = 3, 12  # bar inset within a lane; picture margin


def fail(msg, code=2):
    print(f"timeline_png.py: {msg}", file=sys.stderr)
    sys.exit(code)


def load(path):
    """The trace's metadata and its lanes {(pid, tid): [[start, end, cat, name], ...]}."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    except (ValueError, RecursionError) as e:
        fail(f"{path} is not valid JSON: {e}")
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        fail(f"{path}: expected a JSON object with a \"traceEvents\" list "
             "(a trace written by sac --timeline)")
    other = doc.get("otherData") if isinstance(doc.get("otherData"), dict) else {}
    procs, threads, lanes = {}, {}, {}
    for i, ev in enumerate(doc["traceEvents"]):
        if not isinstance(ev, dict) or ev.get("ph") not in ("M", "X"):
            continue
        pid, tid = ev.get("pid", 0), ev.get("tid", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, tid)):
            fail(f"{path}: traceEvents[{i}]: pid and tid must be integers")
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        if ev["ph"] == "M":
            if ev.get("name") == "process_name" and "name" in args:
                procs[pid] = str(args["name"])
            elif ev.get("name") == "thread_name" and "name" in args:
                threads[pid, tid] = str(args["name"])
            continue
        ts, dur = ev.get("ts"), ev.get("dur", 0.0)
        for key, v in (("ts", ts), ("dur", dur)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(f"{path}: traceEvents[{i}] (\"X\"): {key} is {v!r}, not a number")
        start = ts / 1e6
        lanes.setdefault((pid, tid), []).append(
            [start, start + max(dur, 0) / 1e6, str(ev.get("cat", "")), str(ev.get("name", ""))])
    if not lanes:
        fail(f"{path}: no complete (\"X\") events: nothing to draw")
    labels = {k: f"{procs.get(k[0], f'rank {k[0]}')} / {threads.get(k, f'thread {k[1]}')}"
              for k in lanes}
    return other, labels, lanes


def nest(spans):
    """Sorts a lane's spans (start, longer first) and appends each one's depth and parent index.

    A span is nested in the innermost earlier one that contains it, give or take 10 ns (sac
    rounds ts and dur to 1 ns each, so one span may seem to end just after the next starts).
    """
    spans.sort(key=lambda s: (s[0], s[0] - s[1]))
    stack = []
    for i, s in enumerate(spans):
        while stack and not (spans[stack[-1]][0] - 1e-8 <= s[0]
                             and s[1] <= spans[stack[-1]][1] + 1e-8
                             and s[0] < spans[stack[-1]][1] - 1e-8):
            stack.pop()
        s += [len(stack), stack[-1] if stack else None]
        stack.append(i)


def self_times(spans, lo, hi):
    """{category: seconds} in the lane's innermost spans within [lo, hi]."""
    own = [max(0.0, min(s[1], hi) - max(s[0], lo)) for s in spans]
    for s in spans:
        if s[5] is not None:
            parent = spans[s[5]]
            own[s[5]] -= max(0.0, min(s[1], parent[1], hi) - max(s[0], lo))
    totals = {}
    for s, t in zip(spans, own):
        totals[s[2]] = totals.get(s[2], 0.0) + max(t, 0.0)
    return totals


def font(size):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default()


def fit(draw, text, fnt, width):
    """`text`, shortened with "..." to fit `width` pixels, or "" if not even 3 characters fit."""
    if draw.textlength(text, font=fnt) <= width:
        return text
    for n in range(len(text) - 1, 2, -1):
        short = text[:n].rstrip() + "..."
        if draw.textlength(short, font=fnt) <= width:
            return short
    return ""


def nice_step(span, ticks):
    """A 1/2/5 x 10^k step that cuts `span` into about `ticks` parts."""
    raw = span / max(ticks, 1)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def mix(hex_colour, towards, f):
    """`hex_colour` moved a fraction `f` of the way to the grey level `towards` (0 to 255)."""
    return tuple(int(c + (towards - c) * f) for c in bytes.fromhex(hex_colour[1:]))


def render(args, other, labels, lanes, lo, hi):
    small, normal, big = font(11), font(12), font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = probe.textbbox((0, 0), "Ag", font=small)[3]
    step = text_h + 5  # height of one nesting level
    keys = sorted(lanes)
    heights = [2 * PAD + step * (1 + min(4, max(s[4] for s in lanes[k]))) for k in keys]
    cats = sorted({s[2] for k in keys for s in lanes[k] if s[1] >= lo and s[0] <= hi},
                  key=lambda c: (list(COLOURS).index(c) if c in COLOURS else len(COLOURS), c))
    label_w = min(args.width // 3,
                  8 + max(probe.textlength(labels[k], font=normal) for k in keys))
    left, right = MARGIN + label_w + 8, args.width - MARGIN
    if right - left < 100:
        fail(f"--width {args.width} is too small for the lane labels", code=1)
    # The legend: one swatch + name per category, wrapped over as many rows as needed.
    legend, x, y = [], left, 0
    for c in cats:
        w = 16 + probe.textlength(c, font=normal) + 18
        if x + w > right and x > left:
            x, y = left, y + 20
        legend.append((x, y, c))
        x += w
    top = MARGIN + 48  # below the title and subtitle
    axis_y = top + sum(heights)
    legend_y = axis_y + 44
    img = Image.new("RGB", (args.width, legend_y + y + 20 + MARGIN), "white")
    d = ImageDraw.Draw(img)
    command, ranks = other.get("command", "?"), other.get("ranks", len({k[0] for k in keys}))
    d.text((MARGIN, MARGIN), args.title or f"sac {command}: timeline of {ranks} ranks",
           font=big, fill="black")
    sub = f"{lo:.3f} s to {hi:.3f} s since the first event"
    if other.get("window"):
        sub = f"{other['window']}; shown: {sub}"
    d.text((MARGIN, MARGIN + 24), sub, font=small, fill="#555555")
    scale = (right - left) / (hi - lo)
    # Ticks and grid lines, in ms below 2 s of window, else in s.
    unit, mult = ("s", 1.0) if hi - lo >= 2 else ("ms", 1e3)
    tick = nice_step((hi - lo) * mult, (right - left) / 110) / mult
    t = math.ceil(lo / tick - 1e-9) * tick
    while t <= hi + 1e-12:
        x = left + (t - lo) * scale
        d.line([(x, top), (x, axis_y)], fill="#e4e4e4")
        d.line([(x, axis_y), (x, axis_y + 4)], fill="black")
        txt = f"{t * mult:.6g}"
        tw = d.textlength(txt, font=small)
        d.text((min(x - tw / 2, args.width - 2 - tw), axis_y + 6), txt, font=small, fill="black")
        t += tick
    d.line([(left, axis_y), (right, axis_y)], fill="black")
    caption = f"time since the first event ({unit})"
    d.text(((left + right - d.textlength(caption, font=normal)) / 2, axis_y + 22), caption,
           font=normal, fill="black")
    y0 = top
    for n, (k, h) in enumerate(zip(keys, heights)):
        if n and k[0] != keys[n - 1][0]:
            d.line([(MARGIN, y0), (right, y0)], fill="#999999")
        d.text((MARGIN, y0 + (h - text_h) / 2), fit(d, labels[k], normal, label_w),
               font=normal, fill="black")
        for start, end, cat, name, depth, _ in lanes[k]:
            if end < lo or start > hi:
                continue
            xa = left + (max(start, lo) - lo) * scale
            xb = max(xa + 1, left + (min(end, hi) - lo) * scale)
            ya, yb = y0 + PAD + min(depth, 4) * step, y0 + h - PAD
            colour = mix(COLOURS.get(cat, GREY), 255, 0.2 * min(depth, 4))  # nested: lighter
            edge = mix(COLOURS.get(cat, GREY), 0, 0.4) if xb - xa >= 4 else colour
            d.rectangle([xa, ya, xb - 1, yb], fill=colour, outline=edge)
            if xb - xa > 24:
                d.text((xa + 3, ya + 2), fit(d, name, small, xb - xa - 6), font=small,
                       fill="black")
        y0 += h
    for x, y, c in legend:
        d.rectangle([x, legend_y + y + 2, x + 12, legend_y + y + 14],
                    fill=COLOURS.get(c, GREY), outline="#555555")
        d.text((x + 16, legend_y + y), c, font=normal, fill="black")
    return img


def main():
    ap = argparse.ArgumentParser(
        description="Render a Chrome trace written by `sac train/evaluate --timeline FILE` "
                    "as a PNG Gantt chart (one lane per rank and thread), and print each "
                    "lane's time per category.",
        epilog="Times are seconds since the trace's first event.")
    ap.add_argument("trace", metavar="TRACE.json", help="the trace sac wrote")
    ap.add_argument("out", metavar="OUT.png", help="the picture to write")
    ap.add_argument("--from", dest="start", type=float, metavar="SECONDS",
                    help="start of the window shown (default: the first event)")
    ap.add_argument("--to", dest="end", type=float, metavar="SECONDS",
                    help="end of the window shown (default: the end of the last event)")
    ap.add_argument("--width", type=int, default=1600, metavar="PIXELS",
                    help="width of the picture (default: 1600)")
    ap.add_argument("--title", metavar="TEXT",
                    help='title line (default: "sac COMMAND: timeline of N ranks")')
    args = ap.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when the table is piped to `head`
    if not 300 <= args.width <= 30000:
        ap.error("--width must be between 300 and 30000 pixels")
    other, labels, lanes = load(args.trace)
    t0 = min(s[0] for spans in lanes.values() for s in spans)
    for spans in lanes.values():
        for s in spans:  # seconds since the first event
            s[0], s[1] = s[0] - t0, s[1] - t0
        nest(spans)
    last = max(s[1] for spans in lanes.values() for s in spans)
    lo = args.start if args.start is not None else 0.0
    hi = args.end if args.end is not None else max(last, lo + 1e-6)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        ap.error(f"the window --from {lo:g} --to {hi:g} (seconds) is empty")
    if not any(s[1] >= lo and s[0] <= hi for spans in lanes.values() for s in spans):
        print(f"timeline_png.py: warning: no span in {lo:g}-{hi:g} s (the trace ends at "
              f"{last:g} s)", file=sys.stderr)
    img = render(args, other, labels, lanes, lo, hi)
    try:
        img.save(args.out, format="PNG")
    except (OSError, ValueError) as e:
        fail(f"cannot write {args.out}: {e}", code=1)
    print(f"| lane | category | time (ms) | share of {(hi - lo) * 1e3:.1f} ms |")
    print("|---|---|---:|---:|")
    for k in sorted(lanes):
        for cat, secs in sorted(self_times(lanes[k], lo, hi).items(), key=lambda x: -x[1]):
            if secs > 0:
                print(f"| {labels[k]} | {cat} | {secs * 1e3:.1f} | "
                      f"{100 * secs / (hi - lo):.1f}% |")


if __name__ == "__main__":
    main()
