//! Durations in attributes: `"500ms"`, `"30s"`, `"2m"`, `"1h"`.

/// Milliseconds of a duration literal, or why it is not one.
pub(crate) fn parse_millis(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write a whole number and a unit, like \"500ms\", \"30s\", \"2m\" or \"1h\""))?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "{s:?} has no known unit: write a whole number and one of ms, s, m, h, like \"30s\""
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn units() {
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("2m"), Ok(120_000));
        assert_eq!(parse_millis("1h"), Ok(3_600_000));
        assert!(parse_millis("30").is_err());
        assert!(parse_millis("1.5s").is_err());
        assert!(parse_millis("s").is_err());
        assert!(parse_millis("3d").is_err());
    }
}
