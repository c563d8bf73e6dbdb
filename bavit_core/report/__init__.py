"""Reports: Table-1/Table-2 tables, figures and the HTML page."""
