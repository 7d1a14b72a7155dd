"""A room's assignments: the teacher's signed list of what every machine should hold
(``record``), how members hand it on (``wire``), act on it and keep the room's copies
(``keeper``), and what the teacher sees of the room (``status``)."""
