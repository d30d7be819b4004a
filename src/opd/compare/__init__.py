"""Comparisons of methods: ``opd compare`` (:mod:`~opd.compare.driver`), its report
(:mod:`~opd.compare.report`) and the quickstart (:mod:`~opd.compare.quickstart`)."""
