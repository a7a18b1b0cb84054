"""Pure numeric code: privacy accounting, rankings, fits, charts. Imports no other project package."""
