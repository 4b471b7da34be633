"""Reports a reader can take away: the paper's comparison as Markdown, CSV and PNG plots."""
