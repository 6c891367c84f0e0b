"""Figures (matplotlib PNGs) and the self-contained HTML page of an evaluation; a suite's report."""

# The curves a suite's report draws, one PNG each with every run on it (Exercises 2.4 and 4.3),
# drawn only when some run recorded its column; curves.png shows them together.
PANELS = {
    "test_acc": ("test accuracy", "Test accuracy per epoch, all runs (a record: best.pt is chosen on validation)"),
    "val_acc": ("validation accuracy", "Validation accuracy per epoch, all runs"),
    "train_loss": ("training loss", "Training loss per epoch, all runs"),
}  # fmt: skip
# every file of a suite's report in --out, index.html first (`suite.write_suite_report`); no
# suite run may take one of these names
REPORT_FILES = ["index.html", "results.csv", "results.md", "curves.png", "mixup_examples.png",
                *(f"curves_{key}.png" for key in PANELS)]  # fmt: skip
