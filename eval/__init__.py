"""Layer 4 of 5 (indexing < search < ltr < eval < search.app): datasets and run files, metrics,
significance tests, the experiment runner, reports and plots, click models and simulation,
propensity fitting, and hybrid-tuned (fusion tuned by an eval metric)."""
