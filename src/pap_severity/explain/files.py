"""The files the explain stage writes in reports/explain/<pipeline>/, named once: the report page,
the registry and the CLI read these names without loading the IG code."""

REPORT_FILE = "report.html"
GALLERY_FILE = "gallery.html"  # the misclassified cells
ATTRIBUTIONS_FILE = "attributions.csv"
SUMMARY_FILE = "summary.json"  # the DVC metric
EXPLAIN_FILES = (REPORT_FILE, ATTRIBUTIONS_FILE, SUMMARY_FILE)  # what the registry attaches to a version
