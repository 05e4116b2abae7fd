# Results table, figures and the HTML report.
