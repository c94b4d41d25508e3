"""Pictures and tables of fitted statistics: the report stage and the audit."""
