"""What a finished search gives its user: held-out scores, exported models, reports, comparisons and plots
(reads the archive; never imported by the search itself)."""
