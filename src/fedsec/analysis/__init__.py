"""Analysis of results folders: tables, the risk matrix, figures, the report page and the threat
map. It reads run and sweep folders and never imports the engines (``fedsec report``)."""
