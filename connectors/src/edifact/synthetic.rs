//! Synthetic MEDLAB interchanges for benchmarks and load tests. Invented patients only:
//! BSNs start with 9999 and pass the eleven-test, names are made up.

use std::fmt::Write as _;

/// A BSN-shaped number from `seed` that passes the eleven-test (prefix `9999`).
#[must_use]
pub fn synthetic_bsn(seed: u32) -> String {
    let mut n = seed;
    loop {
        let digits = format!("9999{:04}", n % 10_000);
        if let Some(check) = crate::zib::bsn_check_digit(&digits) {
            return format!("{digits}{check}");
        }
        n = n.wrapping_add(1);
    }
}

/// One interchange holding `messages` MEDLAB:1 messages of about 1 kB each, with
/// release characters, repeat counters, CR LF after terminators and pending results.
#[must_use]
pub fn synthetic_medlab(messages: usize) -> Vec<u8> {
    let mut s = String::with_capacity(messages * 1100 + 200);
    s.push_str("UNA:+.? '\r\nUNB+UNOA:1+500001234+500005678+261101:0815+IC0001'\r\n");
    for m in 0..messages {
        let seed = u32::try_from(m).unwrap_or(u32::MAX);
        let mut segs = 0;
        let mut seg = |s: &mut String, text: &str| {
            s.push_str(text);
            s.push_str("'\r\n");
            segs += 1;
        };
        seg(&mut s, &format!("UNH+M{m:06}+MEDLAB:1"));
        seg(
            &mut s,
            "ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567+LAB01",
        );
        seg(
            &mut s,
            &format!(
                "PID+19{:02}:{:02}:{:02}+{}+Jansen:van:Bakker::Pieter:P.++BSN{}",
                40 + m % 60,
                1 + m % 12,
                1 + m % 28,
                if m % 2 == 0 { "M" } else { "V" },
                synthetic_bsn(seed)
            ),
        );
        seg(&mut s, "PAD+Dorpsstraat:7 a::Haren:9751AA");
        seg(
            &mut s,
            "ART+H+01234567+A. de Vries+Markt:1::Haren:9751AB+050-1234567",
        );
        seg(&mut s, "AFD+Klinische chemie");
        seg(&mut s, "ARA:1+Dr. A. de Boer");
        seg(
            &mut s,
            &format!("DET+26:11:{:02}+07:{:02}", 1 + m % 28, m % 60),
        );
        seg(&mut s, &format!("IDE+J+L{m:07}+bloed"));
        seg(&mut s, "SEC+HEMATOLOGIE");
        seg(&mut s, "BEP:1:1:1+0+Hemoglobine+8.6++mmol/l+N+7.5+10.0+HB");
        seg(&mut s, "BEP:1:1:2+0+Hematocriet+0.40++l/l++0.35+0.50+HT  B");
        seg(
            &mut s,
            "BEP:1:1:3+0+Leukocyten+11.2++10*9/l+H+4.0+10.0+LEUC",
        );
        seg(&mut s, "OPB:1:1:3:1+Licht verhoogd?: controle over 2 weken");
        seg(&mut s, "SEC+CHEMIE");
        seg(&mut s, "BEP:1:2:1+0+Kreatinine+88++umol/l++60+110+KREA");
        seg(&mut s, "BEP:1:2:2+0+Kalium+5.9++mmol/l+>+3.5+5.0+K");
        seg(
            &mut s,
            "OPB:1:2:2:1+Hemolytisch monster?: herhalen aanbevolen",
        );
        seg(&mut s, "BEP:1:2:3+0+Natrium+140++mmol/l++135+145+NA");
        seg(
            &mut s,
            "BEP:1:2:4+0+Glucose nuchter+6.1++mmol/l+H+4.0+6.0+GLUC",
        );
        seg(&mut s, "NUB:1:1+HbA1c");
        seg(
            &mut s,
            "COM+Uitslagen geautoriseerd door klinisch chemicus?; vragen? Bel 050-1234567",
        );
        let _ = write!(s, "UNT+{}+M{m:06}'\r\n", segs + 1);
    }
    let _ = write!(s, "UNZ+{messages}+IC0001'\r\n");
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edifact::parse_strict;

    #[test]
    fn synthetic_bsns_pass_the_eleven_test() {
        for seed in 0..200 {
            let bsn = synthetic_bsn(seed);
            assert_eq!(bsn.len(), 9);
            assert!(bsn.starts_with("9999"), "{bsn}");
            assert!(crate::zib::bsn_is_valid(&bsn), "{bsn}");
        }
    }

    #[test]
    fn synthetic_interchange_is_well_formed() {
        let bytes = synthetic_medlab(50);
        let doc = parse_strict(&bytes).unwrap();
        assert_eq!(doc.messages().len(), 50);
        assert!(doc.messages().all(|m| m.message_type() == "MEDLAB"));
    }
}
