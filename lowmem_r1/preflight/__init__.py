"""Before spending GPU hours: will it fit (plan), can this machine run it (doctor), do the rewards
score what they should (rewards check/score)."""
