"""Job backends: where jobs come from and how a process is adopted into one."""
