//! The three facts pg-watcher reads from a certificate: the subject common name (who the
//! caller is), the DNS subject alternative names (which member a certificate names) and the
//! end of validity (the expiry metric). A small DER reader: certificates reaching it were
//! already verified by rustls (or are our own), and it never panics on any input (fuzzed in
//! its tests); anything it does not understand yields `None`.

/// What pg-watcher uses of a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: Option<i64>,
}

/// One DER element: (tag, contents, rest of the input).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    let contents = input.get(header..end)?;
    let rest = input.get(end..)?;
    Some((tag, contents, rest))
}

/// The elements of a constructed value, in order.
fn children(mut input: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let (t, c, rest) = tlv(input)?;
        out.push((t, c));
        input = rest;
        if out.len() > 1024 {
            return None;
        }
    }
    Some(out)
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

/// Reads a DER certificate.
pub fn parse(der: &[u8]) -> Option<CertInfo> {
    let (t, cert, _) = tlv(der)?;
    if t != SEQUENCE {
        return None;
    }
    let (t, tbs, _) = tlv(cert)?;
    if t != SEQUENCE {
        return None;
    }
    let mut fields = children(tbs)?.into_iter().peekable();
    // [0] EXPLICIT version, optional.
    if fields.peek().is_some_and(|(t, _)| *t == 0xa0) {
        fields.next();
    }
    let _serial = fields.next()?;
    let _signature = fields.next()?;
    let _issuer = fields.next()?;
    let (vt, validity) = fields.next()?;
    let (st, subject) = fields.next()?;
    if vt != SEQUENCE || st != SEQUENCE {
        return None;
    }
    let mut info = CertInfo {
        not_after: children(validity)?.get(1).and_then(|(t, v)| time(*t, v)),
        ..Default::default()
    };
    for (t, rdn) in children(subject)? {
        if t != SET {
            continue;
        }
        for (t, atv) in children(rdn)? {
            if t != SEQUENCE {
                continue;
            }
            let kids = children(atv)?;
            if let (Some((OID, oid)), Some((_, value))) = (kids.first(), kids.get(1)) {
                if *oid == OID_CN {
                    info.common_name = std::str::from_utf8(value).ok().map(str::to_string);
                }
            }
        }
    }
    for (t, ext) in fields {
        if t != 0xa3 {
            continue;
        }
        let (t, list, _) = tlv(ext)?;
        if t != SEQUENCE {
            continue;
        }
        for (t, e) in children(list)? {
            if t != SEQUENCE {
                continue;
            }
            let kids = children(e)?;
            if !matches!(kids.first(), Some((OID, oid)) if *oid == OID_SAN) {
                continue;
            }
            // [critical BOOLEAN] then the OCTET STRING holding GeneralNames.
            let Some((_, value)) = kids.iter().rev().find(|(t, _)| *t == 0x04) else {
                continue;
            };
            let (t, names, _) = tlv(value)?;
            if t != SEQUENCE {
                continue;
            }
            for (t, n) in children(names)? {
                // dNSName: [2] IMPLICIT IA5String.
                if t == 0x82 {
                    if let Ok(s) = std::str::from_utf8(n) {
                        info.dns_names.push(s.to_string());
                    }
                }
            }
        }
    }
    Some(info)
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) as Unix seconds.
fn time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let s = s.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 if s.len() == 14 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (mo, d, h, mi, se) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(time(0x17, b"261130235322Z"), Some(1_796_082_802));
        assert_eq!(time(0x18, b"20261130235322Z"), Some(1_796_082_802));
        assert_eq!(time(0x18, b"2026113023532Z"), None);
    }

    #[test]
    fn garbage_never_panics() {
        // Every prefix and every single-byte corruption of a plausible header.
        let sample: Vec<u8> = vec![
            0x30, 0x82, 0x01, 0x00, 0x30, 0x81, 0x10, 0xa0, 0x03, 0x02, 0x01, 0x02,
        ];
        for n in 0..=sample.len() {
            let _ = parse(&sample[..n]);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x & 0xff) as u8
                })
                .collect();
            let _ = parse(&bytes);
            let mut framed = vec![0x30, 0x82, (len >> 8) as u8, len as u8];
            framed.extend_from_slice(&bytes);
            let _ = parse(&framed);
        }
        assert_eq!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(tlv(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
