"""Figures (matplotlib PNGs) and the self-contained HTML page of an evaluation; a suite's report."""

# the curves a suite's report draws, one PNG each (`suite.PANELS`)
PANEL_KEYS = ("test_acc", "val_acc", "train_loss")
# every file of a suite's report in --out, index.html first (`suite.write_suite_report`); no
# suite run may take one of these names
REPORT_FILES = ["index.html", "results.csv", "results.md", "curves.png", "mixup_examples.png",
                *(f"curves_{key}.png" for key in PANEL_KEYS)]  # fmt: skip
