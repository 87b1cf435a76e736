"""What a person reads: the run report (report_assets/ holds its template, CSS and page code) and
exports of a finished run (export/, one module per format).

Reads a finished run: may import run/ (results) and everything below it. Never tasks/ or flows/.
"""
