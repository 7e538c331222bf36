"""One network pass per view (the default) against one pass over both views, per WCL step.

``python bench/view_passes.py`` times forward + backward of the whole WCL model (both
views, both losses) for the demo network (ResNet-10 width 32, 28 px, batch 256) and
ResNet-50 at 64 px (batch 32), channels_last, with ``model.concat_views`` off and on,
alternating the two over 2 rounds in one process, median of 6 steps each. Ratio =
per view / one pass (above 1: the single pass is faster). Writes
runs/bench/view_passes.json.
"""

from layout import compare_steps, step_seconds


def main() -> None:
    compare_steps(
        {"per_view": lambda spec: step_seconds(spec, concat_views=False),
         "one_pass": lambda spec: step_seconds(spec, concat_views=True)},
        "view_passes.json",
    )  # fmt: skip


if __name__ == "__main__":
    main()
