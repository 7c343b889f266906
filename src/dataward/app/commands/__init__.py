"""The ``dataward`` commands, grouped by concern; :mod:`dataward.app.cli` registers them on one typer app."""
