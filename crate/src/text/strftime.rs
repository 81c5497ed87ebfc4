//! `strftime_now` for chat templates (Llama 3.2's calls `strftime_now("%d %b %Y")`), in UTC: std
//! has no time zones, and wasm32 has no clock but JavaScript's.

const MONTHS: [&str; 12] = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// Seconds since 1970-01-01 UTC.
#[cfg(not(target_arch = "wasm32"))]
pub fn unix_now() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs() as i64,
        Err(before) => -(before.duration().as_secs() as i64),
    }
}

/// Seconds since 1970-01-01 UTC. `std::time::SystemTime::now` panics on wasm32-unknown-unknown.
#[cfg(target_arch = "wasm32")]
pub fn unix_now() -> i64 {
    #[wasm_bindgen::prelude::wasm_bindgen]
    extern "C" {
        #[wasm_bindgen(js_namespace = Date, js_name = now)]
        fn date_now() -> f64;
    }
    (date_now() / 1000.0).floor() as i64
}

/// Formats `unix_seconds` (UTC) like Python's `strftime` for the common directives: %a %A %b %B
/// %d %m %y %Y %H %I %M %S %p %%, and the glibc `-` flag (`%-d`) that drops the leading zero.
pub fn strftime(format: &str, unix_seconds: i64) -> Result<String, String> {
    let days = unix_seconds.div_euclid(86_400);
    let seconds_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (seconds_of_day / 3600, seconds_of_day / 60 % 60, seconds_of_day % 60);
    let weekday = WEEKDAYS[(days + 4).rem_euclid(7) as usize]; // 1970-01-01 was a Thursday
    let month_name = MONTHS[month as usize - 1];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut directive = chars.next();
        let unpadded = directive == Some('-');
        if unpadded {
            directive = chars.next();
        }
        let number = |n: i64| if unpadded { n.to_string() } else { format!("{n:02}") };
        match directive {
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('d') => out.push_str(&number(day)),
            Some('m') => out.push_str(&number(month)),
            Some('y') => out.push_str(&number(year.rem_euclid(100))),
            Some('Y') => out.push_str(&year.to_string()),
            Some('H') => out.push_str(&number(hour)),
            Some('I') => out.push_str(&number(hour12)),
            Some('M') => out.push_str(&number(minute)),
            Some('S') => out.push_str(&number(second)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('%') if !unpadded => out.push('%'),
            Some(other) => {
                let flag = if unpadded { "-" } else { "" };
                return Err(format!("strftime_now: unsupported directive %{flag}{other}"));
            }
            None => return Err("strftime_now: format ends in a lone %".into()),
        }
    }
    Ok(out)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01, in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March is 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        // 2024-07-26 14:05:09 UTC, a Friday; Python: datetime(...).strftime(...)
        let t = 1_722_002_709;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%A %-d %B %y, %I:%M:%S %p %%", t).unwrap(), "Friday 26 July 24, 02:05:09 PM %");
        assert_eq!(strftime("%a %d.%m.%Y %H", 0).unwrap(), "Thu 01.01.1970 00");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert_eq!(strftime("%Y-%m-%d", -86_400).unwrap(), "1969-12-31");
        assert!(strftime("%Q", t).unwrap_err().contains("%Q"));
    }
}
