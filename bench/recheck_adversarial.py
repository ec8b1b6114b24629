"""An independent re-check of a stored adversarial set.

Downloads ``adversarial/set.pt`` from an attack run, loads the attacked model again from its
URI, re-predicts the stored adversarial images and counts those the model classifies wrong with
at least the given confidence: it trusts neither the attack's success flags nor its stored
predictions.

    python bench/recheck_adversarial.py --adversarial <attack run id> [--confidence 0.99]
"""

from __future__ import annotations

import argparse

import torch

from cifarx.inference.transfer import load_set
from cifarx.tracking import common, models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adversarial", required=True, help="attack run id or set.pt path")
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()

    uri = common.tracking_uri(args.tracking_uri)
    adv_set = load_set(args.adversarial, uri)
    model = models.load_model(adv_set["model_uri"], uri)
    with torch.no_grad():
        probs = model(adv_set["adv_images"].float()).softmax(1)
        clean = model(adv_set["images"].float()).argmax(1)
    conf, predicted = probs.max(1)
    labels = adv_set["labels"]
    fooled = (predicted != labels) & (conf >= args.confidence)
    classes = adv_set["classes"]
    print(f"{'#':>3}  {'true':<11}{'clean':<11}{'adversarial':<13}{'conf':>7}  {'L-inf':>7}  ok")
    for i in range(len(labels)):
        print(f"{i:>3}  {classes[labels[i]]:<11}{classes[clean[i]]:<11}"
              f"{classes[predicted[i]]:<13}{conf[i]:>7.2%}  {adv_set['linf'][i] * 255:>5.1f}/255"
              f"  {'yes' if fooled[i] else 'NO'}")
    print(f"\n{int(fooled.sum())} of {len(labels)} adversarial images are classified wrong with "
          f">= {args.confidence:.0%} confidence by {adv_set['model_uri']} (re-predicted from the "
          f"stored float32 images); originals classified right: "
          f"{int((clean == labels).sum())} of {len(labels)}")


if __name__ == "__main__":
    main()
